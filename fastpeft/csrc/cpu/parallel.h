// Threading helpers shared by the CPU ops.
//
// The kernels give the same bits for every intra-op thread count (torch.set_num_threads):
// their work is cut into pieces whose bounds depend only on the shapes, each piece is
// computed the same way whichever thread runs it, and partial sums are added in a fixed
// order. (The one exception is lora_linear's base GEMM, which ATen threads itself; see
// lora_linear.cpp.) parallel_for_aten carries this to the ATen GEMMs a piece calls.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#if defined(__linux__)
// MKL's service function (mkl_service.h): sets the number of threads MKL uses on the
// calling thread, 0 meaning "the global setting"; returns the previous local setting.
// Weak: torch's MKL builds export it and the loader binds it, other builds leave it null.
extern "C" int MKL_Set_Num_Threads_Local(int nthreads) __attribute__((weak));
#endif

namespace fastpeft::cpu {

// Tasks per at::parallel_for chunk so that a chunk is worth ~64K multiply-adds.
inline int64_t work_grain(int64_t macs_per_task) {
  return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, macs_per_task));
}

// While alive, MKL runs single-threaded on the constructing thread. A GEMM's bits then
// depend only on its shapes: MKL picks its algorithm (how it splits and orders the
// reduction over K) by the number of threads it may use, even inside an OpenMP parallel
// region where it then runs on one thread, so the same GEMM gives other bits for another
// torch.set_num_threads (torch.mm does too). Without MKL this does nothing.
class SingleThreadedMkl {
 public:
  SingleThreadedMkl() {
#if defined(__linux__)
    if (MKL_Set_Num_Threads_Local != nullptr) previous_ = MKL_Set_Num_Threads_Local(1);
#endif
  }
  ~SingleThreadedMkl() {
#if defined(__linux__)
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(previous_);
#endif
  }
  SingleThreadedMkl(const SingleThreadedMkl&) = delete;
  SingleThreadedMkl& operator=(const SingleThreadedMkl&) = delete;

 private:
  int previous_ = 0;
};

// Runs body(begin, end) over the tasks [0, n) on the intra-op threads, as
// at::parallel_for with grain 1, for bodies that call ATen ops (GEMMs on cached blocks):
// * below autograd on every thread: at::parallel_for does not carry the caller's
//   dispatch-key state to its OpenMP workers, and an input that requires grad would
//   otherwise send a worker's ATen calls through autograd (out= variants then raise);
// * with single-threaded MKL (SingleThreadedMkl): each task is one thread's work, and its
//   GEMMs give the same bits whatever the thread count.
template <typename Body>
void parallel_for_aten(int64_t n, const Body& body) {
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    SingleThreadedMkl single_threaded_mkl;
    body(begin, end);
  });
}

}  // namespace fastpeft::cpu
