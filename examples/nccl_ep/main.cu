// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
//
// Expert parallelism over NCCL, one process per GPU, the way a model runtime runs an MoE layer.
//
// Every rank builds the same global layer from a fixed seed (64 experts, top-8, hidden 512,
// intermediate 256, bf16, SwiGLU, softmax router with renormalisation) and uploads only its own
// experts' weights (ExpertPlacement::contiguous over the world size), as a runtime loads its shard
// of a checkpoint. On its own stream, over the NcclCommunicator that from_env() builds, it runs
//   - ExpertParallel<Grouped, AllToAll, Cuda> on its own tokens (different on every rank; a rank
//     may have none, see --tokens), and
//   - ExpertParallel<Grouped, AllGather, Cuda> on a token set that every rank holds,
// and checks each output against the Host backend run on the same inputs with every expert on one
// rank. One line per rank and policy: tokens, max relative error, ms per forward.
//
// Launch (README.md): mpirun -np N ./nccl_ep, or torchrun --no-python --nproc-per-node N ./nccl_ep,
// with EPX_NCCL_ID_DIR or NCCL_COMM_ID set. Exit status: 0 every check passed; 1 a check failed or
// an epx::Error was thrown (printed; a lost peer ends at --timeout-s, never in a hang); 2 bad
// options; 77 no GPU (skipped; a failure when EPX_REQUIRE_GPU=1).

#include <epx/cuda.cuh>
#include <epx/nccl.hpp>

#include <fmt/format.h>

#include <cuda_runtime.h>
#include <nccl.h>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

constexpr std::int32_t kExperts = 64, kTopK = 8, kHidden = 512, kIntermediate = 256;
constexpr std::size_t kGateUpSize = std::size_t{2} * kIntermediate * kHidden;  // one expert's gate_up
constexpr std::size_t kDownSize = std::size_t{kHidden} * kIntermediate;        // one expert's down
constexpr std::uint32_t kSeed = 2026;
constexpr std::int64_t kMaxTokens = 65536;  // per rank; keeps the AllToAll workspace within a GPU
constexpr double kTolerance = 1e-2;         // bf16: one rounding of each output, a few of the inputs
using T = epx::bfloat16;

constexpr std::string_view kUsage =
    "usage: nccl_ep [--tokens N[,N...]] [--timeout-s S] [--policy alltoall|allgather|both] [--iters N]\n"
    "  --tokens     tokens per rank for AllToAll (default 128); a list is cycled over the ranks, e.g.\n"
    "               64,0 gives even ranks 64 tokens and odd ranks none. AllGather runs on one shared\n"
    "               set of max(list) tokens.\n"
    "  --timeout-s  the communicator's deadline in seconds (default 120): a peer that fails or never\n"
    "               arrives ends in an error after this long instead of a hang\n"
    "  --policy     which dispatch policies to run (default both)\n"
    "  --iters      timed forwards per policy, after two warm-up forwards (default 20)\n"
    "Launch one process per GPU with mpirun or torchrun --no-python, and EPX_NCCL_ID_DIR or NCCL_COMM_ID\n"
    "set (see examples/nccl_ep/README.md).\n";

// A bad command line: printed with the usage, exit status 2.
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Options {
  std::vector<std::int64_t> tokens{128};  // per rank, cycled over the ranks
  std::int64_t timeout_s = 120;
  bool all_to_all = true, all_gather = true;
  std::int64_t iters = 20;
  bool help = false;
};

std::int64_t parse_integer(std::string_view option, std::string_view text, std::int64_t min, std::int64_t max) {
  std::int64_t value = 0;
  auto const [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (text.empty() || ec != std::errc{} || end != text.data() + text.size() || value < min || value > max)
    throw UsageError(fmt::format("{} = \"{}\", expected an integer in [{}, {}]", option, text, min, max));
  return value;
}

// Accepts "--name value" and "--name=value". Every rank parses the same command line, so every
// rank refuses a bad one alike, before any collective.
Options parse_options(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string_view arg = argv[i], value;
    if (arg == "-h" || arg == "--help") {
      o.help = true;
      continue;
    }
    if (auto const eq = arg.find('='); arg.starts_with("--") && eq != std::string_view::npos) {
      value = arg.substr(eq + 1);
      arg = arg.substr(0, eq);
    } else if (arg == "--tokens" || arg == "--timeout-s" || arg == "--policy" || arg == "--iters") {
      if (i + 1 >= argc) throw UsageError(fmt::format("{} has no value", arg));
      value = argv[++i];
    }
    if (arg == "--tokens") {
      o.tokens.clear();
      for (std::size_t at = 0;;) {
        auto const comma = value.find(',', at);
        o.tokens.push_back(parse_integer("--tokens", value.substr(at, comma - at), 0, kMaxTokens));
        if (comma == std::string_view::npos) break;
        at = comma + 1;
      }
    } else if (arg == "--timeout-s") {
      o.timeout_s = parse_integer("--timeout-s", value, 1, 24 * 3600);
    } else if (arg == "--iters") {
      o.iters = parse_integer("--iters", value, 1, 100000);
    } else if (arg == "--policy") {
      if (value != "alltoall" && value != "allgather" && value != "both")
        throw UsageError(fmt::format("--policy = \"{}\", expected alltoall, allgather or both", value));
      o.all_to_all = value != "allgather";
      o.all_gather = value != "alltoall";
    } else {
      throw UsageError(fmt::format("unknown option \"{}\"", argv[i]));
    }
  }
  return o;
}

// A generator per (purpose, index): expert e's weights and rank r's tokens are the same on every
// rank and in every run, whatever else the process draws.
enum class Draw : std::uint32_t { kExpert = 1, kRankTokens = 2, kSharedTokens = 3 };

std::mt19937_64 generator(Draw purpose, std::uint64_t index) {
  std::seed_seq seq{kSeed, static_cast<std::uint32_t>(purpose), static_cast<std::uint32_t>(index),
                    static_cast<std::uint32_t>(index >> 32)};
  return std::mt19937_64(seq);
}

void fill_normal(T* out, std::size_t n, float scale, std::mt19937_64& rng) {
  std::normal_distribution<float> dist(0.0f, scale);
  for (std::size_t i = 0; i < n; ++i) out[i] = epx::from_float<T>(dist(rng));
}

// `count` experts' weights, stacked, as views with their extents: the layer checks them against
// its config and refuses a transposed or mis-sized tensor instead of misreading it.
template <class E>
epx::ExpertWeights weights_of(std::int64_t count, E* gate_up, E* down) {
  return epx::expert_weights(epx::TensorView(gate_up, {count, 2 * kIntermediate, kHidden}),
                             epx::TensorView(down, {count, kHidden, kIntermediate}));
}

// The whole layer in host memory, as a checkpoint holds it. Rank r hands epx only the slice of
// its experts; the Host reference uses all of it.
struct Model {
  epx::RouterConfig router{.num_experts = kExperts, .top_k = kTopK, .renormalize = true};
  epx::ExpertMlpConfig mlp{.hidden = kHidden, .intermediate = kIntermediate, .activation = epx::Activation::kSwiGLU};
  std::vector<T> gate_up;  // [E, 2I, H]: gate rows, then up rows (GateUpLayout::kConcatenated)
  std::vector<T> down;     // [E, H, I]
};

Model make_model() {
  Model m;
  m.gate_up.resize(kExperts * kGateUpSize);
  m.down.resize(kExperts * kDownSize);
  for (std::int32_t e = 0; e < kExperts; ++e) {
    auto rng = generator(Draw::kExpert, static_cast<std::uint64_t>(e));
    // About 1/sqrt(fan-in), so that activations stay O(1) through the layer.
    fill_normal(m.gate_up.data() + e * kGateUpSize, kGateUpSize, 0.045f, rng);
    fill_normal(m.down.data() + e * kDownSize, kDownSize, 0.0625f, rng);
  }
  return m;
}

// Tokens and their router logits, in host memory.
struct Tokens {
  std::int64_t count = 0;
  std::vector<T> x;           // [count, H]
  std::vector<float> logits;  // [count, E]
};

// The logits of a token are a random permutation of evenly spaced levels. Two experts' scores are
// then never within rounding of each other, so the GPU router (whose expf differs from the host's
// in the last ulp) picks exactly the experts the Host reference picks, and a mismatch in the
// check is a real error, not a legitimate near-tie flip.
Tokens make_tokens(std::int64_t count, Draw purpose, std::uint64_t index) {
  auto rng = generator(purpose, index);
  Tokens t;
  t.count = count;
  t.x.resize(static_cast<std::size_t>(count) * kHidden);
  fill_normal(t.x.data(), t.x.size(), 1.0f, rng);
  t.logits.resize(static_cast<std::size_t>(count) * kExperts);
  std::vector<std::int32_t> levels(kExperts);
  for (std::int64_t i = 0; i < count; ++i) {
    std::iota(levels.begin(), levels.end(), 0);
    std::shuffle(levels.begin(), levels.end(), rng);
    for (std::int32_t e = 0; e < kExperts; ++e)
      t.logits[static_cast<std::size_t>(i) * kExperts + e] = 0.125f * static_cast<float>(levels[e] - kExperts / 2);
  }
  return t;
}

// The layer with every expert on one rank, on the Host backend: what each rank's output must match.
std::vector<T> host_reference(Model const& model, Tokens const& tokens) {
  std::vector<T> y(tokens.x.size());
  epx::LocalGroup group(1);
  group.run([&](int, epx::Communicator& comm) {
    epx::ExpertParallel<epx::Grouped, epx::AllToAll, epx::Host> moe(
        {.router = model.router,
         .mlp = model.mlp,
         .weights = weights_of<T const>(kExperts, model.gate_up.data(), model.down.data())},
        comm);
    std::vector<std::byte> workspace(moe.workspace_bytes(tokens.count));
    moe.forward(epx::Host{}, epx::MatrixView<float const>(tokens.logits.data(), tokens.count, kExperts),
                epx::MatrixView<T const>(tokens.x.data(), tokens.count, kHidden),
                epx::MatrixView<T>(y.data(), tokens.count, kHidden), {workspace.data(), workspace.size()});
  });
  return y;
}

// max |got - want| / max |want|: the error relative to the output's scale (0 when both are empty).
double max_rel_error(std::vector<T> const& got, std::vector<T> const& want) {
  double diff = 0.0, scale = 0.0;
  for (std::size_t i = 0; i < want.size(); ++i) {
    double const g = epx::to_float(got[i]), w = epx::to_float(want[i]);
    diff = std::isfinite(g) ? std::max(diff, std::abs(g - w)) : INFINITY;
    scale = std::max(scale, std::abs(w));
  }
  if (diff == 0.0) return 0.0;
  return scale > 0.0 ? diff / scale : INFINITY;
}

// Device memory owned by the example (a runtime would use its own allocator). Allocated once at
// set-up, never on the forward path.
template <class U>
class DeviceBuffer {
 public:
  explicit DeviceBuffer(std::size_t count) : count_(count) {
    if (count > 0) EPX_CUDA_CHECK(cudaMalloc(&data_, count * sizeof(U)));
  }
  DeviceBuffer(DeviceBuffer const&) = delete;
  DeviceBuffer& operator=(DeviceBuffer const&) = delete;
  ~DeviceBuffer() { (void)cudaFree(data_); }
  [[nodiscard]] U* data() const noexcept { return data_; }
  [[nodiscard]] std::size_t size() const noexcept { return count_; }
  [[nodiscard]] std::size_t bytes() const noexcept { return count_ * sizeof(U); }

 private:
  U* data_ = nullptr;
  std::size_t count_ = 0;
};

// Host -> device on `stream`. From pageable memory the call returns once the source is staged,
// so `host` may go away after it.
template <class U>
void upload(DeviceBuffer<U>& dst, U const* host, cudaStream_t stream) {
  if (dst.size() > 0) EPX_CUDA_CHECK(cudaMemcpyAsync(dst.data(), host, dst.bytes(), cudaMemcpyHostToDevice, stream));
}

// Device -> host after the stream's work. The copy itself would wait for every collective before
// it with no deadline, so the communicator's bounded wait comes first: a lost peer ends in an
// Error there instead of a hang inside cudaMemcpy.
template <class U>
std::vector<U> download(epx::NcclCommunicator& comm, cudaStream_t stream, DeviceBuffer<U> const& src) {
  comm.wait(epx::StreamRef(stream));
  std::vector<U> out(src.size());
  if (src.size() > 0)
    EPX_CUDA_CHECK(cudaMemcpyAsync(out.data(), src.data(), src.bytes(), cudaMemcpyDeviceToHost, stream));
  EPX_CUDA_CHECK(cudaStreamSynchronize(stream));  // only the copy is left on the stream
  return out;
}

class Stream {
 public:
  Stream() { EPX_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking)); }
  Stream(Stream const&) = delete;
  Stream& operator=(Stream const&) = delete;
  ~Stream() { (void)cudaStreamDestroy(stream_); }
  [[nodiscard]] cudaStream_t get() const noexcept { return stream_; }

 private:
  cudaStream_t stream_ = nullptr;
};

class Event {
 public:
  Event() { EPX_CUDA_CHECK(cudaEventCreate(&event_)); }
  Event(Event const&) = delete;
  Event& operator=(Event const&) = delete;
  ~Event() { (void)cudaEventDestroy(event_); }
  [[nodiscard]] cudaEvent_t get() const noexcept { return event_; }

 private:
  cudaEvent_t event_ = nullptr;
};

// This rank's experts on the device: its slice of the global weights, nothing else.
struct LocalExperts {
  epx::ExpertRange range;
  DeviceBuffer<T> gate_up, down;

  LocalExperts(Model const& model, epx::ExpertRange r, cudaStream_t stream)
      : range(r),
        gate_up(static_cast<std::size_t>(r.count) * kGateUpSize),
        down(static_cast<std::size_t>(r.count) * kDownSize) {
    upload(gate_up, model.gate_up.data() + static_cast<std::size_t>(r.first) * kGateUpSize, stream);
    upload(down, model.down.data() + static_cast<std::size_t>(r.first) * kDownSize, stream);
  }
};

// Aborts the communicator when an exception leaves the scope, before the scope's device buffers are
// freed: cudaFree waits for the whole device, and an NCCL kernel still waiting for a peer would make
// it wait forever. The abort makes NCCL's kernels quit; the peers end at their own deadline.
class AbortOnUnwind {
 public:
  explicit AbortOnUnwind(epx::NcclCommunicator& comm) : comm_(comm), uncaught_(std::uncaught_exceptions()) {}
  AbortOnUnwind(AbortOnUnwind const&) = delete;
  AbortOnUnwind& operator=(AbortOnUnwind const&) = delete;
  ~AbortOnUnwind() {
    if (std::uncaught_exceptions() > uncaught_) comm_.abort("nccl_ep: this rank failed (its error is printed)");
  }

 private:
  epx::NcclCommunicator& comm_;
  int uncaught_;
};

struct Outcome {
  double max_rel_error = 0.0;
  bool repeatable = true;  // the last timed forward gave the bits of the last warm-up
  double ms_per_forward = 0.0;
  epx::Status status = {};
};

// One policy on this rank: forwards on the GPU, timed with events after a warm-up, then checked.
// Every rank makes the same calls in the same order (also one with no tokens): the collectives
// inside forward pair up across ranks.
template <class Dispatch>
Outcome run_policy(epx::NcclCommunicator& comm, cudaStream_t stream, Model const& model, LocalExperts const& experts,
                   Tokens const& tokens, std::int64_t max_tokens, std::int64_t iters, std::vector<T> const& want) {
  epx::StreamRef const ref(stream);
  epx::ExpertParallel<epx::Grouped, Dispatch, epx::Cuda> moe(
      {.router = model.router,
       .mlp = model.mlp,
       .weights = weights_of<T const>(experts.range.count, experts.gate_up.data(), experts.down.data()),
       .placement = epx::ExpertPlacement::contiguous(kExperts, comm.size())},
      comm);
  // Sized once for the largest batch any rank passes (AllToAll: every rank's tokens may land here).
  DeviceBuffer<std::byte> workspace(moe.workspace_bytes(max_tokens));
  DeviceBuffer<float> logits(tokens.logits.size());
  DeviceBuffer<T> x(tokens.x.size()), y(tokens.x.size());
  upload(logits, tokens.logits.data(), stream);
  upload(x, tokens.x.data(), stream);
  AbortOnUnwind const abort_on_unwind(comm);

  auto const forward = [&] {
    moe.forward(ref, epx::MatrixView<float const>(logits.data(), tokens.count, kExperts),
                epx::MatrixView<T const>(x.data(), tokens.count, kHidden),
                epx::MatrixView<T>(y.data(), tokens.count, kHidden), {workspace.data(), workspace.bytes()});
  };
  // Two warm-ups: NCCL connects peers on first use, and the kernels load on first launch.
  forward();
  forward();
  auto const first = download(comm, stream, y);

  Event start, stop;
  EPX_CUDA_CHECK(cudaEventRecord(start.get(), stream));
  for (std::int64_t i = 0; i < iters; ++i) forward();
  EPX_CUDA_CHECK(cudaEventRecord(stop.get(), stream));
  auto const got = download(comm, stream, y);
  float ms = 0.0f;
  EPX_CUDA_CHECK(cudaEventElapsedTime(&ms, start.get(), stop.get()));

  Outcome out;
  out.max_rel_error = max_rel_error(got, want);
  out.repeatable =
      first.size() == got.size() && (got.empty() || std::memcmp(first.data(), got.data(), got.size() * sizeof(T)) == 0);
  out.ms_per_forward = static_cast<double>(ms) / static_cast<double>(iters);
  out.status = moe.status(ref);  // AllGather: one copy and a bounded wait; AllToAll: already on the host
  return out;
}

// Prints a line at once: several processes share the terminal, and a killed one loses its buffer.
template <class... Args>
void print_line(fmt::format_string<Args...> format, Args&&... args) {
  std::string line = fmt::format(format, std::forward<Args>(args)...);
  line += '\n';
  std::fwrite(line.data(), 1, line.size(), stdout);
  std::fflush(stdout);
}

bool report(epx::NcclCommunicator const& comm, std::string_view policy, epx::ExpertRange local, std::int64_t tokens,
            Outcome const& o) {
  bool const pass = o.max_rel_error <= kTolerance && o.repeatable && o.status.dropped_slots == 0;
  print_line(
      "rank {}/{} | {:<9} | tokens {:>5} | experts [{:>2}, {:>2}) | max rel. error {:.2e} | {:>8.3f} ms/forward "
      "| busiest local expert {:>5} rows | {}{}",
      comm.rank(), comm.size(), policy, tokens, local.first, local.first + local.count, o.max_rel_error,
      o.ms_per_forward, o.status.max_tokens_per_expert, pass ? "PASS" : "FAIL",
      o.repeatable ? "" : " (not bitwise repeatable)");
  return pass;
}

// Which rank this process is, for messages written before the communicator exists.
std::string launcher_rank() {
  for (char const* name : {"RANK", "OMPI_COMM_WORLD_RANK"})
    if (char const* v = std::getenv(name); v != nullptr && *v != '\0') return v;
  return "?";
}

int run(Options const& options) {
  // The communicator: rank, world size and GPU from the launcher; LOCAL_RANK's GPU is current from
  // here on, so every allocation and stream below is on it.
  auto comm = epx::NcclCommunicator::from_env({.timeout = std::chrono::seconds(options.timeout_s)});
  int const rank = comm.rank(), world = comm.size();
  auto const num_lists = static_cast<std::int64_t>(options.tokens.size());
  std::int64_t const my_tokens = options.tokens[static_cast<std::size_t>(rank % num_lists)];
  std::int64_t const max_tokens = *std::max_element(options.tokens.begin(), options.tokens.end());

  if (rank == 0) {
    int nccl_version = 0;
    EPX_NCCL_CHECK(ncclGetVersion(&nccl_version));
    cudaDeviceProp prop{};
    EPX_CUDA_CHECK(cudaGetDeviceProperties(&prop, comm.device()));
    print_line(
        "epx {}.{}.{} nccl_ep: {} ranks, NCCL {}, rank 0 on {}; {} experts, top-{}, hidden {}, intermediate "
        "{}, bf16, SwiGLU; tolerance {:.0e}",
        EPX_VERSION_MAJOR, EPX_VERSION_MINOR, EPX_VERSION_PATCH, world, nccl_version, prop.name, kExperts, kTopK,
        kHidden, kIntermediate, kTolerance);
  }

  Model const model = make_model();
  auto const placement = epx::ExpertPlacement::contiguous(kExperts, world);
  Stream stream;
  LocalExperts const experts(model, placement.local_range(rank), stream.get());
  AbortOnUnwind const abort_on_unwind(comm);
  bool ok = true;

  if (options.all_to_all) {
    // This rank's own tokens: a different set on every rank.
    Tokens const tokens = make_tokens(my_tokens, Draw::kRankTokens, static_cast<std::uint64_t>(rank));
    auto const want = host_reference(model, tokens);
    auto const o =
        run_policy<epx::AllToAll>(comm, stream.get(), model, experts, tokens, max_tokens, options.iters, want);
    ok = report(comm, "AllToAll", experts.range, tokens.count, o) && ok;
  }
  if (options.all_gather) {
    // AllGather needs the same tokens on every rank (as after tensor-parallel attention).
    Tokens const tokens = make_tokens(max_tokens, Draw::kSharedTokens, 0);
    auto const want = host_reference(model, tokens);
    auto const o =
        run_policy<epx::AllGather>(comm, stream.get(), model, experts, tokens, max_tokens, options.iters, want);
    ok = report(comm, "AllGather", experts.range, tokens.count, o) && ok;
  }
  // Every rank's work is done before the communicator is finalised (collectively, in its destructor).
  comm.wait(epx::StreamRef(stream.get()));
  return ok ? 0 : 1;
}

bool gpu_required() {
  char const* v = std::getenv("EPX_REQUIRE_GPU");
  return v != nullptr && *v != '\0' && std::strcmp(v, "0") != 0;
}

}  // namespace

int main(int argc, char** argv) {
  Options options;
  try {
    options = parse_options(argc, argv);
  } catch (UsageError const& e) {
    std::fprintf(stderr, "nccl_ep: %s\n%.*s", e.what(), static_cast<int>(kUsage.size()), kUsage.data());
    return 2;
  }
  if (options.help) {
    std::fwrite(kUsage.data(), 1, kUsage.size(), stdout);
    return 0;
  }

  int devices = 0;
  cudaError_t const probed = cudaGetDeviceCount(&devices);
  if (probed != cudaSuccess || devices == 0) {
    (void)cudaGetLastError();  // "no device" is the answer here, not an error to report later
    bool const required = gpu_required();
    std::printf("nccl_ep: no CUDA device (%s), %s\n",
                probed != cudaSuccess ? cudaGetErrorString(probed) : "cudaGetDeviceCount returned 0",
                required ? "and EPX_REQUIRE_GPU is set: failed" : "skipped");
    return required ? 1 : 77;
  }

  try {
    return run(options);
  } catch (epx::Error const& e) {
    // Printed by every rank that fails; a rank whose peer failed reports kTimeout or kPeerFailed
    // within --timeout-s.
    std::fprintf(stderr, "nccl_ep: rank %s: epx::Error (%s): %s\n", launcher_rank().c_str(),
                 std::string(epx::to_string(e.code())).c_str(), e.what());
    return 1;
  } catch (std::exception const& e) {
    std::fprintf(stderr, "nccl_ep: rank %s: %s\n", launcher_rank().c_str(), e.what());
    return 1;
  }
}
