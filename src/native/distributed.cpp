// Data parallel on libtorch's own c10d: a TCPStore for the rendezvous and a
// Gloo (CPU) or NCCL (CUDA) backend for the collectives, behind a C ABI
// that Rust calls (src/train/distributed.rs holds its safe face).
//
// Gloo's own types are only passed around, never looked into: the headers
// this builds against (Debian's libgloo-dev) are not the gloo torch bundles.
// Tensors cross as tch's C_tensor (a heap at::Tensor*); every C++ exception
// becomes a malloc'ed message, so nothing unwinds into Rust.
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef SDTUNE_WITH_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <chrono>
#include <cstdlib>
#include <string>

#include "error_message.h"

namespace {

using sdtune::guarded;

struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
  std::chrono::milliseconds timeout;
};

bool is_loopback(const std::string& addr) {
  return addr == "localhost" || addr.rfind("127.", 0) == 0 || addr == "::1";
}

// Where this rank's Gloo connections listen: loopback for a one-machine
// job, GLOO_SOCKET_IFNAME when set (as torch.distributed reads it), else
// the address this machine's hostname resolves to.
std::shared_ptr<::gloo::transport::Device> gloo_device(const std::string& master) {
  if (is_loopback(master)) return c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1");
  if (const char* ifname = std::getenv("GLOO_SOCKET_IFNAME"); ifname && *ifname)
    return c10d::ProcessGroupGloo::createDeviceForInterface(ifname);
  return c10d::ProcessGroupGloo::createDefaultDevice();
}

// One collective's completion within the group's timeout.
void finish(const Group& g, const c10::intrusive_ptr<c10d::Work>& work, const char* what) {
  if (!work->wait(g.timeout)) throw std::runtime_error(std::string(what) + " did not complete within the timeout");
}

}  // namespace

extern "C" {

// 1 when this build can make NCCL groups.
int sdtune_dist_has_nccl() {
#ifdef SDTUNE_WITH_NCCL
  return 1;
#else
  return 0;
#endif
}

// Joins the job: the store at addr:port (rank 0 serves it unless
// `agent_store`, torchrun's agent already does), then the backend ("gloo",
// or "nccl" on CUDA device `cuda_device`). Returns the group, or NULL with
// *error set to a malloc'ed message.
void* sdtune_dist_init(const char* backend, int rank, int world, const char* addr, int port, int64_t timeout_ms,
                       int agent_store, int cuda_device, char** error) {
  Group* group = nullptr;
  *error = guarded("c10d", [&] {
    const std::string kind(backend);
    const std::chrono::milliseconds timeout(timeout_ms);
    c10d::TCPStoreOptions opts;
    opts.port = static_cast<std::uint16_t>(port);
    opts.isServer = rank == 0 && !agent_store;
    opts.numWorkers = static_cast<std::size_t>(world);
    opts.waitWorkers = false;
    opts.timeout = timeout;
    auto tcp = c10::make_intrusive<c10d::TCPStore>(std::string(addr), opts);
    // Own keys, apart from those of torchrun's agent in a shared store.
    auto store = c10::make_intrusive<c10d::PrefixStore>("sdtune", tcp);
    c10::intrusive_ptr<c10d::Backend> made;
    if (kind == "gloo") {
      auto options = c10d::ProcessGroupGloo::Options::create(timeout);
      options->devices.push_back(gloo_device(addr));
      options->threads = 1;
      made = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, options);
    } else if (kind == "nccl") {
#ifdef SDTUNE_WITH_NCCL
      c10::cuda::set_device(static_cast<c10::DeviceIndex>(cuda_device));
      auto options = c10d::ProcessGroupNCCL::Options::create();
      options->timeout = timeout;
      made = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world, options);
#else
      (void)cuda_device;
      throw std::runtime_error("this sdtune was built without NCCL (no CUDA and NCCL headers at build time)");
#endif
    } else {
      throw std::runtime_error("unknown backend " + kind + " (gloo or nccl)");
    }
    group = new Group{store, made, timeout};
  });
  return group;
}

// Sums `tensor` over all ranks, in place.
char* sdtune_dist_all_reduce_sum(void* handle, at::Tensor* tensor) {
  return guarded("c10d", [&] {
    auto& g = *static_cast<Group*>(handle);
    std::vector<at::Tensor> tensors{*tensor};
    finish(g, g.backend->allreduce(tensors, c10d::AllreduceOptions{}), "an all-reduce");
  });
}

// Replaces `tensor` on every rank by rank `root`'s.
char* sdtune_dist_broadcast(void* handle, at::Tensor* tensor, int root) {
  return guarded("c10d", [&] {
    auto& g = *static_cast<Group*>(handle);
    std::vector<at::Tensor> tensors{*tensor};
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    finish(g, g.backend->broadcast(tensors, opts), "a broadcast");
  });
}

// Returns once every rank has called it.
char* sdtune_dist_barrier(void* handle) {
  return guarded("c10d", [&] {
    auto& g = *static_cast<Group*>(handle);
    finish(g, g.backend->barrier(c10d::BarrierOptions{}), "a barrier");
  });
}

// Leaves the job and frees the group.
void sdtune_dist_shutdown(void* handle) {
  auto* g = static_cast<Group*>(handle);
  // A failing shutdown (a peer already gone) still frees what is ours.
  char* ignored = guarded("c10d", [&] { g->backend->shutdown(); });
  std::free(ignored);
  try {
    delete g;
  } catch (...) {
  }
}

}  // extern "C"
