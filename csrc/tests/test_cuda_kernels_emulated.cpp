// The CUDA kernels of csrc/kernels, run by the CPU emulation of the launch model
// (cuda_emulation.h; sources rewritten by tools/cuda_emulation.py), against float64 loops.
// This checks indexing, masks, grid-stride loops, barriers and the two-stage reductions without a
// GPU; it says nothing about speed, fp16/bf16 rounding or memory ordering between blocks.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "launchers.h"

using namespace gmem_kernels::cuda;

namespace {

int failures = 0, checks = 0;
std::mt19937 rng(1);

template <typename T>
std::vector<T> randn(size_t n) {
  std::normal_distribution<double> normal;
  std::vector<T> v(n);
  for (auto& x : v) x = T(normal(rng));
  return v;
}

template <typename T>
constexpr DType dtype_of() {
  return sizeof(T) == 4 ? DType::kFloat32 : DType::kFloat64;
}

template <typename T>
void expect_close(const char* what, const std::vector<T>& got, const std::vector<double>& want, const char* config) {
  ++checks;
  const double tol = sizeof(T) == 4 ? 1e-4 : 1e-10;
  for (size_t i = 0; i < want.size(); ++i) {
    if (!(std::fabs(double(got[i]) - want[i]) <= tol * (1 + std::fabs(want[i])))) {
      std::printf("FAIL %s [%s] at %zu: %g, expected %g\n", what, config, i, double(got[i]), want[i]);
      ++failures;
      return;
    }
  }
}

void expect_ok(cudaError_t err, const char* what) {
  ++checks;
  if (err != cudaSuccess) {
    std::printf("FAIL %s: launch error %d\n", what, err);
    ++failures;
  }
}

// weight [T, R, K] = gamma [T, R] * weight_norm [R, K] + beta [T, R], and its window sums
template <typename T>
void test_madafm() {
  for (int64_t tasks : {1, 3})
    for (int64_t rows : {1, 7, 300})
      for (int64_t window : {1, 9, 4}) {
        char config[96];
        std::snprintf(config, sizeof config, "T=%ld R=%ld K=%ld %zu-byte", long(tasks), long(rows), long(window),
                      sizeof(T));
        auto wn = randn<T>(rows * window), g = randn<T>(tasks * rows), b = randn<T>(tasks * rows);
        std::vector<T> w(tasks * rows * window, T(777));
        expect_ok(madafm_weight(dtype_of<T>(), wn.data(), g.data(), b.data(), w.data(), tasks, rows, window, nullptr),
                  "madafm_weight");
        std::vector<double> want(w.size());
        for (int64_t t = 0; t < tasks; ++t)
          for (int64_t j = 0; j < rows; ++j)
            for (int64_t k = 0; k < window; ++k)
              want[(t * rows + j) * window + k] = double(g[t * rows + j]) * wn[j * window + k] + b[t * rows + j];
        expect_close("madafm_weight", w, want, config);

        auto dw = randn<T>(tasks * rows * window);
        std::vector<T> dg(tasks * rows, T(777)), db(tasks * rows, T(777));
        expect_ok(madafm_weight_backward(dtype_of<T>(), dw.data(), wn.data(), dg.data(), db.data(), tasks, rows,
                                         window, nullptr),
                  "madafm_weight_backward");
        std::vector<double> want_g(tasks * rows), want_b(tasks * rows);
        for (int64_t t = 0; t < tasks; ++t)
          for (int64_t j = 0; j < rows; ++j)
            for (int64_t k = 0; k < window; ++k) {
              want_g[t * rows + j] += double(dw[(t * rows + j) * window + k]) * wn[j * window + k];
              want_b[t * rows + j] += dw[(t * rows + j) * window + k];
            }
        expect_close("madafm_weight_backward dgamma", dg, want_g, config);
        expect_close("madafm_weight_backward dbeta", db, want_b, config);
      }
}

struct FilmCase {
  int64_t m, o, tasks;
  bool with_ids;
  std::vector<int64_t> ids;
  char config[96];
  FilmCase(int64_t m_, int64_t o_, int64_t tasks_, bool with_ids_, size_t bytes)
      : m(m_), o(o_), tasks(tasks_), with_ids(with_ids_), ids(m_) {
    for (auto& id : ids) id = int64_t(rng() % tasks);
    std::snprintf(config, sizeof config, "M=%ld O=%ld T=%ld ids=%d %zu-byte", long(m), long(o), long(tasks),
                  int(with_ids), bytes);
  }
  const int64_t* id_ptr() const { return with_ids ? ids.data() : nullptr; }
  int64_t task(int64_t row) const { return with_ids ? ids[row] : 0; }
};

// mFiLM epilogue and input gradient
template <typename T>
void test_film_rows(const FilmCase& fc) {
  const int64_t m = fc.m, o = fc.o;
  auto h = randn<T>(m * o), rowsum = randn<T>(m), g = randn<T>(fc.tasks * o), b = randn<T>(fc.tasks * o);
  auto c = randn<T>(fc.tasks * o);
  auto y = h;
  expect_ok(film_forward(dtype_of<T>(), y.data(), rowsum.data(), g.data(), b.data(), c.data(), fc.id_ptr(), m, o,
                         nullptr),
            "film_forward");
  std::vector<double> want(m * o);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < o; ++j) {
      const int64_t s = fc.task(i) * o + j;
      want[i * o + j] = double(g[s]) * h[i * o + j] + double(b[s]) * rowsum[i] + c[s];
    }
  expect_close("film_forward", y, want, fc.config);

  auto dy = randn<T>(m * o);
  std::vector<T> gdy(m * o, T(777)), rowdot(m, T(777));
  expect_ok(film_backward_input(dtype_of<T>(), dy.data(), g.data(), b.data(), fc.id_ptr(), gdy.data(), rowdot.data(),
                                m, o, nullptr),
            "film_backward_input");
  std::vector<double> want_gdy(m * o), want_rowdot(m);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < o; ++j) {
      want_gdy[i * o + j] = double(dy[i * o + j]) * g[fc.task(i) * o + j];
      want_rowdot[i] += double(dy[i * o + j]) * b[fc.task(i) * o + j];
    }
  expect_close("film_backward_input gdy", gdy, want_gdy, fc.config);
  expect_close("film_backward_input rowdot", rowdot, want_rowdot, fc.config);
}

// mFiLM per-task style sums, every combination of requested outputs
template <typename T>
void test_film_style(const FilmCase& fc) {
  const int64_t m = fc.m, o = fc.o, tasks = fc.tasks;
  auto dy = randn<T>(m * o), h = randn<T>(m * o), rowsum = randn<T>(m);
  std::vector<double> want_g(tasks * o), want_b(tasks * o), want_c(tasks * o);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < o; ++j) {
      want_g[fc.task(i) * o + j] += double(dy[i * o + j]) * h[i * o + j];
      want_b[fc.task(i) * o + j] += double(dy[i * o + j]) * rowsum[i];
      want_c[fc.task(i) * o + j] += dy[i * o + j];
    }
  for (int mask = 1; mask < 8; ++mask) {
    std::vector<T> dg(tasks * o, T(0)), db(tasks * o, T(0)), dc(tasks * o, T(0));
    std::vector<char> workspace(film_backward_style_workspace_bytes(dtype_of<T>(), m, o, tasks));
    expect_ok(film_backward_style(dtype_of<T>(), dy.data(), (mask & 1) ? h.data() : nullptr,
                                  (mask & 2) ? rowsum.data() : nullptr, fc.id_ptr(), (mask & 1) ? dg.data() : nullptr,
                                  (mask & 2) ? db.data() : nullptr, (mask & 4) ? dc.data() : nullptr, m, o, tasks,
                                  workspace.data(), nullptr),
              "film_backward_style");
    if (mask & 1) expect_close("film_backward_style dgamma", dg, want_g, fc.config);
    if (mask & 2) expect_close("film_backward_style dbeta", db, want_b, fc.config);
    if (mask & 4) expect_close("film_backward_style dbias", dc, want_c, fc.config);
  }
}

// weight [O*I, K] = (gu diag(gs) gvt) * weight_norm + bu diag(bs) bvt, ranks possibly 0
template <typename T>
void test_lowrank() {
  for (int64_t out_ch : {1, 20})
    for (int64_t in_ch : {1, 70})
      for (int64_t window : {1, 9, 4})
        for (int64_t rank_g : {0, 3})
          for (int64_t rank_b : {1, 2}) {
            char config[96];
            std::snprintf(config, sizeof config, "O=%ld I=%ld K=%ld rg=%ld rb=%ld %zu-byte", long(out_ch),
                          long(in_ch), long(window), long(rank_g), long(rank_b), sizeof(T));
            auto wn = randn<T>(out_ch * in_ch * window);
            auto gu = randn<T>(out_ch * rank_g), gs = randn<T>(rank_g), gvt = randn<T>(rank_g * in_ch);
            auto bu = randn<T>(out_ch * rank_b), bs = randn<T>(rank_b), bvt = randn<T>(rank_b * in_ch);
            std::vector<T> w(wn.size(), T(777));
            expect_ok(lowrank_weight(dtype_of<T>(), wn.data(), gu.data(), gs.data(), gvt.data(), rank_g, bu.data(),
                                     bs.data(), bvt.data(), rank_b, w.data(), out_ch, in_ch, window, nullptr),
                      "lowrank_weight");
            std::vector<double> want(w.size());
            for (int64_t o = 0; o < out_ch; ++o)
              for (int64_t i = 0; i < in_ch; ++i) {
                double gamma = 0, beta = 0;
                for (int64_t r = 0; r < rank_g; ++r) gamma += double(gu[o * rank_g + r]) * gs[r] * gvt[r * in_ch + i];
                for (int64_t r = 0; r < rank_b; ++r) beta += double(bu[o * rank_b + r]) * bs[r] * bvt[r * in_ch + i];
                for (int64_t k = 0; k < window; ++k)
                  want[(o * in_ch + i) * window + k] = gamma * wn[(o * in_ch + i) * window + k] + beta;
              }
            expect_close("lowrank_weight", w, want, config);
          }
}

template <typename T>
void test_all() {
  test_madafm<T>();
  for (int64_t m : {1, 33})
    for (int64_t o : {1, 130})
      for (bool mixed : {false, true}) test_film_rows<T>(FilmCase(m, o, mixed ? 4 : 1, mixed, sizeof(T)));
  for (int64_t m : {1, 65, 300})
    for (int64_t o : {1, 130})
      for (bool mixed : {false, true}) test_film_style<T>(FilmCase(m, o, mixed ? 4 : 1, mixed, sizeof(T)));
  test_film_style<T>(FilmCase(64 * 128 + 77, 2, 3, true, sizeof(T)));  // more rows than 128 chunks of 64
  test_lowrank<T>();
}

}  // namespace

int main() {
  test_all<float>();
  test_all<double>();
  std::printf("%d checks, %d failures, %ld emulated launches\n", checks, failures, gmem_emulation::launches);
  return failures != 0;
}
