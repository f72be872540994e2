// The kernels of ../info_nce_kernels.cu compiled for the CPU emulation (see cuda_emu.h).
#include "cuda_emu.h"
#include "../info_nce_kernels.cu"
