// The CUDA element kernels of the gmem ops as one table (ops.h), for the op bodies' CUDA registrations.
#include "../ops.h"
#include "device.h"

namespace gmem {

const DeviceKernels& cuda_kernels() {
  static const DeviceKernels kernels{madafm_forward_cuda,      madafm_backward_cuda,      film_forward_cuda,
                                     film_backward_input_cuda, film_backward_style_cuda, lowrank_forward_cuda};
  return kernels;
}

}  // namespace gmem
