// Activation dtypes the kernels take, named without any CUDA or torch header so that host code
// (torch_bindings.cpp) and the torch-free launchers share one definition.
#pragma once

namespace persimmon_rt {

enum class DType { kHalf, kBFloat16 };

}  // namespace persimmon_rt
