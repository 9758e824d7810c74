// The CPU element kernels of the gmem ops as one table (ops.h), for the op bodies' CPU registrations.
#include "../ops.h"
#include "device.h"

namespace gmem {

const DeviceKernels& cpu_kernels() {
  static const DeviceKernels kernels{madafm_forward_cpu,      madafm_backward_cpu,     film_forward_cpu,
                                     film_backward_input_cpu, film_backward_style_cpu, lowrank_forward_cpu};
  return kernels;
}

}  // namespace gmem
