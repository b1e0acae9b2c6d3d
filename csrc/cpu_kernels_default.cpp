// Portable copy of the kernels: at::vec's generic implementation, compiled for the
// baseline ISA of the build. Used on CPUs without AVX2 and on non-x86 machines.
#include "cpu_kernels.h"

#define CPU_CAPABILITY DEFAULT
#include "cpu_kernels_impl.h"
