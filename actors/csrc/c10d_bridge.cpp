// deem's bridge to PyTorch's distributed engine (c10d) in the libtorch that tch links: a TCPStore for
// rendezvous and control, process groups (Gloo for CPU tensors; NCCL when built with DEEM_WITH_NCCL)
// with point-to-point and collective operations. Every entry point is `extern "C"`, catches every C++
// exception and hands its message back through `err` (freed with deem_c10d_free_error), so no exception
// crosses into Rust. Tensors arrive as tch's `at::Tensor*` handles: no copy.

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef DEEM_WITH_NCCL
#include <c10/cuda/CUDACachingAllocator.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

namespace {

struct Store {
  c10::intrusive_ptr<c10d::Store> store;
};

struct Group {
  c10::intrusive_ptr<c10d::Backend> backend;
  std::chrono::milliseconds timeout;
};

struct Work {
  c10::intrusive_ptr<c10d::Work> work;
};

char* dup_message(const std::string& s) {
  char* out = static_cast<char*>(std::malloc(s.size() + 1));
  if (out != nullptr) {
    std::memcpy(out, s.c_str(), s.size() + 1);
  }
  return out;
}

// Runs `f`, turning any exception into -1 and a message.
template <typename F>
int guarded(char** err, F&& f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    // c10::Error's what() carries a C++ backtrace after the first line; keep the message.
    std::string msg = e.what();
    auto nl = msg.find("\nException raised from");
    if (nl != std::string::npos) {
      msg.resize(nl);
    }
    *err = dup_message(msg);
  } catch (...) {
    *err = dup_message("unknown C++ exception");
  }
  return -1;
}

std::chrono::milliseconds ms(int64_t v) { return std::chrono::milliseconds(v); }

}  // namespace

extern "C" {

void deem_c10d_free_error(char* err) { std::free(err); }

int deem_c10d_nccl_built() {
#ifdef DEEM_WITH_NCCL
  return 1;
#else
  return 0;
#endif
}

// PyTorch's CUDA caching allocator on `device`: bytes held by live tensors and bytes reserved from
// the driver (torch.cuda.memory_allocated / memory_reserved). 0 in builds without CUDA headers (the
// GPU build is the `nccl` feature) or when the device has no allocator state.
int deem_cuda_allocator_stats(int device, uint64_t* allocated, uint64_t* reserved) {
#ifdef DEEM_WITH_NCCL
  try {
    auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device);
    const auto aggregate = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    *allocated = static_cast<uint64_t>(stats.allocated_bytes[aggregate].current);
    *reserved = static_cast<uint64_t>(stats.reserved_bytes[aggregate].current);
    return 1;
  } catch (...) {
    return 0;
  }
#else
  (void)device;
  (void)allocated;
  (void)reserved;
  return 0;
#endif
}

// A TCPStore client of host:port; the server too when `is_server` (rank 0). Connecting retries until
// `timeout_ms`.
int deem_store_new(const char* host, uint16_t port, int is_server, int64_t timeout_ms, void** out,
                   char** err) {
  return guarded(err, [&] {
    c10d::TCPStoreOptions opts;
    opts.port = port;
    opts.isServer = is_server != 0;
    opts.waitWorkers = false;
    opts.timeout = ms(timeout_ms);
    auto s = new Store{c10::make_intrusive<c10d::TCPStore>(std::string(host), opts)};
    *out = s;
  });
}

void deem_store_free(void* s) { delete static_cast<Store*>(s); }

int deem_store_set(void* s, const char* key, const uint8_t* value, size_t len, char** err) {
  return guarded(err, [&] {
    std::vector<uint8_t> v(value, value + len);
    static_cast<Store*>(s)->store->set(std::string(key), v);
  });
}

// Waits (up to the store's timeout) for `key`, then returns its value (freed with deem_c10d_free_error).
int deem_store_get(void* s, const char* key, uint8_t** value, size_t* len, char** err) {
  return guarded(err, [&] {
    auto v = static_cast<Store*>(s)->store->get(std::string(key));
    auto* buf = static_cast<uint8_t*>(std::malloc(v.size() + 1));
    if (buf == nullptr) {
      throw std::runtime_error("out of memory");
    }
    std::memcpy(buf, v.data(), v.size());
    *value = buf;
    *len = v.size();
  });
}

int deem_store_check(void* s, const char* key, int* found, char** err) {
  return guarded(err, [&] {
    *found = static_cast<Store*>(s)->store->check({std::string(key)}) ? 1 : 0;
  });
}

int deem_store_add(void* s, const char* key, int64_t delta, int64_t* value, char** err) {
  return guarded(err, [&] { *value = static_cast<Store*>(s)->store->add(std::string(key), delta); });
}

// A Gloo process group of `size` ranks over the store, its keys under `prefix` (one per group).
// `iface` (a network interface) or else `hostname` picks the address Gloo binds.
int deem_gloo_new(void* s, const char* prefix, int rank, int size, const char* hostname,
                  const char* iface, int64_t timeout_ms, void** out, char** err) {
  return guarded(err, [&] {
    auto store = c10::make_intrusive<c10d::PrefixStore>(std::string(prefix),
                                                        static_cast<Store*>(s)->store);
    auto opts = c10d::ProcessGroupGloo::Options::create(ms(timeout_ms));
    if (iface != nullptr && iface[0] != '\0') {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(iface));
    } else if (hostname != nullptr && hostname[0] != '\0') {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(hostname));
    } else {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    }
    opts->threads = 1;
    auto pg = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, size, opts);
    *out = new Group{pg, ms(timeout_ms)};
  });
}

// An NCCL process group (GPU tensors); fails when deem was built without the `nccl` feature.
int deem_nccl_new(void* s, const char* prefix, int rank, int size, int64_t timeout_ms, void** out,
                  char** err) {
  return guarded(err, [&] {
#ifdef DEEM_WITH_NCCL
    auto store = c10::make_intrusive<c10d::PrefixStore>(std::string(prefix),
                                                        static_cast<Store*>(s)->store);
    auto opts = c10d::ProcessGroupNCCL::Options::create();
    opts->timeout = ms(timeout_ms);
    auto pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, size, opts);
    *out = new Group{pg, ms(timeout_ms)};
#else
    (void)s, (void)prefix, (void)rank, (void)size, (void)timeout_ms, (void)out;
    throw std::runtime_error("this deem was built without NCCL (cargo feature `nccl`)");
#endif
  });
}

void deem_group_free(void* g) { delete static_cast<Group*>(g); }

int deem_isend(void* g, void* tensor, int dst, int tag, void** work, char** err) {
  return guarded(err, [&] {
    std::vector<at::Tensor> ts{*static_cast<at::Tensor*>(tensor)};
    auto w = static_cast<Group*>(g)->backend->send(ts, dst, tag);
    *work = new Work{w};
  });
}

int deem_irecv(void* g, void* tensor, int src, int tag, void** work, char** err) {
  return guarded(err, [&] {
    std::vector<at::Tensor> ts{*static_cast<at::Tensor*>(tensor)};
    auto w = static_cast<Group*>(g)->backend->recv(ts, src, tag);
    *work = new Work{w};
  });
}

// Waits for a send or receive; an error (a peer gone, the timeout) comes back as -1.
int deem_work_wait(void* w, int64_t timeout_ms, char** err) {
  return guarded(err, [&] {
    if (!static_cast<Work*>(w)->work->wait(ms(timeout_ms))) {
      throw std::runtime_error("did not complete within " + std::to_string(timeout_ms) + " ms");
    }
  });
}

void deem_work_free(void* w) { delete static_cast<Work*>(w); }

// Sums a tensor elementwise across the group, in place, and waits. (c10d reads a list of tensors as one
// per device, all summed together: buckets are flattened by the caller.)
int deem_all_reduce(void* g, void* tensor, char** err) {
  return guarded(err, [&] {
    auto* group = static_cast<Group*>(g);
    std::vector<at::Tensor> ts{*static_cast<at::Tensor*>(tensor)};
    c10d::AllreduceOptions opts;
    opts.reduceOp = c10d::ReduceOp::SUM;
    opts.timeout = group->timeout;
    group->backend->allreduce(ts, opts)->wait(group->timeout);
  });
}

int deem_broadcast(void* g, void* tensor, int root, char** err) {
  return guarded(err, [&] {
    auto* group = static_cast<Group*>(g);
    std::vector<at::Tensor> ts{*static_cast<at::Tensor*>(tensor)};
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    opts.timeout = group->timeout;
    group->backend->broadcast(ts, opts)->wait(group->timeout);
  });
}

int deem_barrier(void* g, char** err) {
  return guarded(err, [&] {
    auto* group = static_cast<Group*>(g);
    c10d::BarrierOptions opts;
    opts.timeout = group->timeout;
    group->backend->barrier(opts)->wait(group->timeout);
  });
}

}  // extern "C"
