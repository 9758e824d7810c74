// The CPU element kernels of the gmem ops (the DeviceKernels table of ops.h, cpu_kernels() in
// device_cpu.cpp): one file per op (madafm_cpu.cpp, linear_cpu.cpp, conv_lowrank_cpu.cpp), each running the
// torch-free kernels of <op>_kernels.h under at::parallel_for (deterministic partitions) for
// float32 and float64.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>

namespace gmem {

// The kernels are built for the baseline ISA and, where GCC can, also for AVX2+FMA (target_clones:
// the loader picks the clone for the CPU at run time; the kernels are forced inline into these
// wrappers, see GMEM_KERNEL_INLINE in madafm_kernels.h). The clone names an ISA level, not a CPU model: GCC picks an
// "arch=haswell" clone only on CPUs it identifies as Haswell-family Intel (on this project's AMD EPYC
// machines the baseline ran instead); "arch=x86-64-v3" (AVX2, FMA, ...; GCC >= 12) is picked by
// features. An AVX-512 clone measured slower here.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && defined(__x86_64__) && defined(__linux__)
#define GMEM_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#elif defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define GMEM_CPU_CLONES __attribute__((target_clones("arch=haswell", "default")))
#else
#define GMEM_CPU_CLONES
#endif

// About this many elements per task keeps the threading overhead small next to the work.
constexpr int64_t kGrainElements = 16384;

inline int64_t grain_rows(int64_t elements_per_row) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, elements_per_row));
}

inline void check_cpu_dtype(const char* op, const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op,
              ": the cpu backend computes in float32 or float64, got ", t.scalar_type());
}

inline const int64_t* ids_ptr(const at::Tensor& task_ids) {
  return task_ids.defined() ? task_ids.data_ptr<int64_t>() : nullptr;
}

// The table's entries (see DeviceKernels in ops.h for what each computes)
void madafm_forward_cpu(const at::Tensor& wn, const at::Tensor& gamma, const at::Tensor& beta, at::Tensor& weight);
void madafm_backward_cpu(const at::Tensor& grad_weight, const at::Tensor& wn, at::Tensor& dgamma, at::Tensor& dbeta);
void film_forward_cpu(at::Tensor& h, const at::Tensor& rowsum, const at::Tensor& gamma, const at::Tensor& beta,
                      const at::Tensor& bias, const at::Tensor& task_ids);
void film_backward_input_cpu(const at::Tensor& grad, const at::Tensor& gamma, const at::Tensor& beta,
                             const at::Tensor& task_ids, at::Tensor& gdy, at::Tensor& rowdot);
void film_backward_style_cpu(const at::Tensor& grad, const at::Tensor& h, const at::Tensor& rowsum,
                             const at::Tensor& task_ids, at::Tensor& dgamma, at::Tensor& dbeta, at::Tensor& dbias);
void lowrank_forward_cpu(const at::Tensor& wn, const at::Tensor& gu, const at::Tensor& gs, const at::Tensor& gvt,
                         const at::Tensor& bu, const at::Tensor& bs, const at::Tensor& bvt, at::Tensor& weight);

}  // namespace gmem
