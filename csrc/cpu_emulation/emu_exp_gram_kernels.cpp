// The kernels of ../exp_gram_kernels.cu compiled for the CPU emulation (see cuda_emu.h).
#include "cuda_emu.h"
#include "../exp_gram_kernels.cu"
