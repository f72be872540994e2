// The kernels of ../itc_kernels.cu compiled for the CPU emulation (see cuda_emu.h).
#include "cuda_emu.h"
#include "../itc_kernels.cu"
