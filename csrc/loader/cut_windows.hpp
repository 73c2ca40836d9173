// Window cutting: the last step of the loader, turning a staging buffer of
// tokens into the (x, y) int64 batch a model consumes (layout and per-thread
// step: cut_windows_device.hpp).
//
// cut_windows_ref is the CPU oracle (and the CPU loader's path);
// cut_windows_emulate runs the kernel's per-thread code on the host;
// launch_cut_windows (cut_windows_launch.hpp, _cuda only) runs the kernel.
#pragma once

#include "loader/cut_windows_device.hpp"

namespace llmio {

// Throws std::invalid_argument naming the window that does not fit, or a bad token_bytes.
void cut_windows_ref(const CutWindowsParams& p);

// Host emulation of cut_windows_kernel: the same per-thread code in loops over
// (window, CTA, thread). Trusts its arguments like the kernel (the binding checks
// them: token_bytes, batch, every window inside the buffer).
void cut_windows_emulate(const CutWindowsParams& p);

}  // namespace llmio
