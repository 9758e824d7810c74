// C++ unit tests of the torch-free CPU kernels (csrc/cpu/*_kernels.h), against naive loops
// in double precision. Built and run by CMake/ctest (tools/test_cpp.sh); no test framework needed.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "../cpu/linear_kernels.h"
#include "../cpu/madafm_kernels.h"
#include "../cpu/lowrank_kernels.h"

namespace kc = gmem_kernels::cpu;

namespace {

int failures = 0;

template <typename T>
std::vector<T> random_vector(size_t n, std::mt19937& rng) {
  std::normal_distribution<double> dist(0.0, 1.0);
  std::vector<T> v(n);
  for (auto& x : v) x = static_cast<T>(dist(rng));
  return v;
}

template <typename T>
void expect_close(const std::string& what, const std::vector<T>& got, const std::vector<double>& want, double tol) {
  if (got.size() != want.size()) {
    std::printf("FAIL %s: size %zu != %zu\n", what.c_str(), got.size(), want.size());
    ++failures;
    return;
  }
  for (size_t i = 0; i < got.size(); ++i) {
    const double err = std::fabs(static_cast<double>(got[i]) - want[i]);
    if (!(err <= tol * (1.0 + std::fabs(want[i])))) {
      std::printf("FAIL %s: element %zu is %.9g, expected %.9g\n", what.c_str(), i, static_cast<double>(got[i]),
                  want[i]);
      ++failures;
      return;
    }
  }
}

// Split [0, n) into `parts` ranges and call f(begin, end) on each, as a thread pool would.
template <typename F>
void in_parts(int64_t n, int64_t parts, F f) {
  for (int64_t p = 0; p < parts; ++p) f(n * p / parts, n * (p + 1) / parts);
}

template <typename T>
void test_madafm(int64_t tasks, int64_t out_ch, int64_t in_ch, int64_t window, int64_t parts, double tol) {
  std::mt19937 rng(static_cast<unsigned>(tasks * 1000 + out_ch * 100 + in_ch * 10 + window));
  const int64_t rows = out_ch * in_ch, total = tasks * rows;
  const auto wn = random_vector<T>(rows * window, rng);
  const auto gamma = random_vector<T>(total, rng), beta = random_vector<T>(total, rng);
  const auto grad = random_vector<T>(total * window, rng);
  std::vector<T> weight(total * window), dgamma(total), dbeta(total);
  in_parts(total, parts, [&](int64_t b, int64_t e) {
    kc::madafm_weight_rows(wn.data(), gamma.data(), beta.data(), weight.data(), rows, window, b, e);
    kc::madafm_weight_backward_rows(grad.data(), wn.data(), dgamma.data(), dbeta.data(), rows, window, b, e);
  });
  std::vector<double> want_w(total * window), want_g(total, 0.0), want_b(total, 0.0);
  for (int64_t t = 0; t < tasks; ++t)
    for (int64_t j = 0; j < rows; ++j)
      for (int64_t k = 0; k < window; ++k) {
        const int64_t r = t * rows + j;
        want_w[r * window + k] = double(gamma[r]) * double(wn[j * window + k]) + double(beta[r]);
        want_g[r] += double(grad[r * window + k]) * double(wn[j * window + k]);
        want_b[r] += double(grad[r * window + k]);
      }
  const std::string name = "madafm T=" + std::to_string(tasks) + " O=" + std::to_string(out_ch) +
                           " I=" + std::to_string(in_ch) + " K=" + std::to_string(window) + " ";
  expect_close(name + "weight", weight, want_w, tol);
  expect_close(name + "dgamma", dgamma, want_g, tol);
  expect_close(name + "dbeta", dbeta, want_b, tol);
}

// A row's result must not depend on where the row ranges were split (threads, task spans, the
// partial last block of the AVX2 3x3 kernels): single- and mixed-task paths rely on it.
template <typename T>
void test_madafm_split_invariant(int64_t tasks, int64_t out_ch, int64_t in_ch, int64_t window) {
  std::mt19937 rng(static_cast<unsigned>(7 + window));
  const int64_t rows = out_ch * in_ch, total = tasks * rows;
  const auto wn = random_vector<T>(rows * window, rng);
  const auto gamma = random_vector<T>(total, rng), beta = random_vector<T>(total, rng);
  const auto grad = random_vector<T>(total * window, rng);
  std::vector<T> w1(total * window), g1(total), b1(total), w2(total * window), g2(total), b2(total);
  kc::madafm_weight_rows(wn.data(), gamma.data(), beta.data(), w1.data(), rows, window, 0, total);
  kc::madafm_weight_backward_rows(grad.data(), wn.data(), g1.data(), b1.data(), rows, window, 0, total);
  in_parts(total, 7, [&](int64_t b, int64_t e) {
    kc::madafm_weight_rows(wn.data(), gamma.data(), beta.data(), w2.data(), rows, window, b, e);
    kc::madafm_weight_backward_rows(grad.data(), wn.data(), g2.data(), b2.data(), rows, window, b, e);
  });
  if (w1 != w2 || g1 != g2 || b1 != b2) {
    std::printf("FAIL madafm K=%lld: results depend on how the rows were split\n", static_cast<long long>(window));
    ++failures;
  }
}

template <typename T>
void test_film(int64_t m, int64_t o, int64_t tasks, bool mixed, bool with_bias, int64_t parts, double tol) {
  std::mt19937 rng(static_cast<unsigned>(m * 100 + o * 10 + tasks));
  const auto h0 = random_vector<T>(m * o, rng), rowsum = random_vector<T>(m, rng), grad = random_vector<T>(m * o, rng);
  const auto gamma = random_vector<T>(tasks * o, rng), beta = random_vector<T>(tasks * o, rng);
  const auto bias = random_vector<T>(tasks * o, rng);
  std::vector<int64_t> ids(m, 0);
  if (mixed)
    for (int64_t i = 0; i < m; ++i) ids[i] = static_cast<int64_t>(rng() % tasks);
  const int64_t* ids_p = mixed ? ids.data() : nullptr;

  std::vector<T> h = h0, gdy(m * o), rowdot(m), dg(tasks * o, T(0)), db(tasks * o, T(0)), dc(tasks * o, T(0));
  in_parts(m, parts, [&](int64_t b, int64_t e) {
    kc::film_forward_rows(h.data(), rowsum.data(), gamma.data(), beta.data(), with_bias ? bias.data() : nullptr,
                          ids_p, o, b, e);
    kc::film_backward_input_rows(grad.data(), gamma.data(), beta.data(), ids_p, gdy.data(), rowdot.data(), o, b, e);
  });
  in_parts(o, parts, [&](int64_t b, int64_t e) {
    kc::film_backward_style_cols(grad.data(), h0.data(), rowsum.data(), ids_p, dg.data(), db.data(), dc.data(), m, o,
                                 b, e);
  });
  std::vector<double> want_h(m * o), want_gdy(m * o), want_dot(m, 0.0), want_dg(tasks * o, 0.0),
      want_db(tasks * o, 0.0), want_dc(tasks * o, 0.0);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t c = 0; c < o; ++c) {
      const int64_t s = ids[i] * o + c, at = i * o + c;
      want_h[at] = double(gamma[s]) * double(h0[at]) + double(beta[s]) * double(rowsum[i]) +
                   (with_bias ? double(bias[s]) : 0.0);
      want_gdy[at] = double(grad[at]) * double(gamma[s]);
      want_dot[i] += double(grad[at]) * double(beta[s]);
      want_dg[s] += double(grad[at]) * double(h0[at]);
      want_db[s] += double(grad[at]) * double(rowsum[i]);
      want_dc[s] += double(grad[at]);
    }
  const std::string name = "film M=" + std::to_string(m) + " O=" + std::to_string(o) + " T=" + std::to_string(tasks) +
                           (mixed ? " mixed " : " single ");
  expect_close(name + "forward", h, want_h, tol);
  expect_close(name + "gdy", gdy, want_gdy, tol);
  expect_close(name + "rowdot", rowdot, want_dot, tol);
  expect_close(name + "dgamma", dg, want_dg, tol);
  expect_close(name + "dbeta", db, want_db, tol);
  expect_close(name + "dbias", dc, want_dc, tol);
}

// The weight build with low-rank styles (csrc/cpu/lowrank_kernels.h) against naive loops: gamma and
// beta rebuilt from their factors (ranks rg, rb; v passed transposed [r, I]), then gamma * wn + beta.
template <typename T>
void test_lowrank(int64_t out_ch, int64_t in_ch, int64_t window, int64_t rg, int64_t rb, int64_t parts, double tol) {
  std::mt19937 rng(static_cast<unsigned>(out_ch * 1000 + in_ch * 100 + window * 10 + rg + rb));
  const int64_t rows = out_ch * in_ch;
  const auto wn = random_vector<T>(rows * window, rng);
  const auto gu = random_vector<T>(out_ch * rg, rng), gs = random_vector<T>(rg, rng);
  const auto gvt = random_vector<T>(rg * in_ch, rng);
  const auto bu = random_vector<T>(out_ch * rb, rng), bs = random_vector<T>(rb, rng);
  const auto bvt = random_vector<T>(rb * in_ch, rng);
  std::vector<T> weight(rows * window);
  in_parts(out_ch, parts, [&](int64_t b, int64_t e) {
    kc::lowrank_weight_rows(wn.data(), gu.data(), gs.data(), gvt.data(), rg, bu.data(), bs.data(), bvt.data(), rb,
                            weight.data(), out_ch, in_ch, window, b, e);
  });
  std::vector<double> want(rows * window);
  for (int64_t o = 0; o < out_ch; ++o)
    for (int64_t i = 0; i < in_ch; ++i) {
      double g = 0, b = 0;
      for (int64_t r = 0; r < rg; ++r) g += double(gu[o * rg + r]) * double(gs[r]) * double(gvt[r * in_ch + i]);
      for (int64_t r = 0; r < rb; ++r) b += double(bu[o * rb + r]) * double(bs[r]) * double(bvt[r * in_ch + i]);
      for (int64_t k = 0; k < window; ++k) {
        const int64_t at = (o * in_ch + i) * window + k;
        want[at] = g * double(wn[at]) + b;
      }
    }
  expect_close("lowrank O=" + std::to_string(out_ch) + " I=" + std::to_string(in_ch) + " K=" +
                   std::to_string(window) + " rg=" + std::to_string(rg) + " rb=" + std::to_string(rb) + " weight",
               weight, want, tol);
}

}  // namespace

int main() {
  // every specialised window (1, 9, 16, 25) and a generic one (6, 49); ranges split at odd places
  for (int64_t window : {1, 6, 9, 16, 25, 49}) {
    test_madafm<double>(1, 3, 5, window, 1, 1e-12);
    test_madafm<double>(4, 7, 3, window, 3, 1e-12);
    test_madafm<float>(3, 5, 2, window, 2, 1e-5);
  }
  test_madafm<double>(2, 0, 3, 9, 1, 1e-12);  // empty layer
  // float 3x3 (the AVX2 kernels where the CPU has them): full blocks of 8 rows and partial ones
  test_madafm<float>(3, 7, 5, 9, 4, 1e-5);
  test_madafm<float>(1, 1, 3, 9, 1, 1e-5);
  for (int64_t window : {9, 16}) test_madafm_split_invariant<float>(3, 7, 5, window);
  test_madafm_split_invariant<double>(3, 7, 5, 9);
  for (int64_t parts : {1, 3}) {
    test_film<double>(7, 5, 1, false, true, parts, 1e-12);
    test_film<double>(9, 13, 4, true, true, parts, 1e-12);
    test_film<double>(6, 3, 3, true, false, parts, 1e-12);
    test_film<float>(11, 17, 5, true, true, parts, 1e-5);
  }
  test_film<double>(1, 1, 1, false, false, 1, 1e-12);  // one sample, one output
  // low-rank styles: windows 1/9/generic, ranks 1..5 (gamma's and beta's differ), I across the
  // 128-wide style blocks (1, 5, 130, 300), split over output channels at odd places
  for (int64_t window : {1, 9, 6}) {
    test_lowrank<double>(3, 5, window, 2, 3, 1, 1e-12);
    test_lowrank<double>(7, 130, window, 1, 1, 3, 1e-12);
    test_lowrank<float>(5, 300, window, 4, 5, 2, 1e-5);
  }
  test_lowrank<double>(1, 1, 1, 1, 1, 1, 1e-12);
  test_lowrank<double>(0, 3, 9, 2, 2, 1, 1e-12);  // empty layer
  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("all CPU kernel checks passed\n");
  return 0;
}
