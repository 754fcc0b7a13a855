// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// Host benchmark of epx::io (bench/NOTES.md has the figures): a generated multi-GB sharded checkpoint
// (Qwen3-MoE's names and widths: 128 experts of H = 2048, I = 768, bf16; two MoE layers, 4 shards; per
// expert as on the Hub, or with --stacked as transformers 5 saves it, [E, 2I, H] and [E, H, I] tensors),
// page cache warm. For one rank's share of one layer it times
//   load   epx::io::load_layer (open + index + config + headers + reads), bf16 -> bf16 (verbatim reads),
//   plain  the same byte ranges read with plain pread() into the same memory, no parsing,
// and reports load's throughput as a fraction of plain's (goal >= 0.8), the extra memory the load took
// (peak RSS above the caller's buffers, by /proc/self/status after clear_refs, and the loader's own
// staging count), and the same for a load that converts (bf16 -> fp32, through the staging buffer).
//
//   io_load_bench [--dir DIR] [--layers N] [--experts E] [--hidden H] [--inter I] [--ranks R] [--rank r]
//                 [--repeat K] [--keep] [--no-goal] [--stacked]
// Exit 1 on an error, or (without --no-goal) when load / plain < 0.8.

#include <epx/epx.hpp>
#include <epx/io.hpp>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

#include <fcntl.h>
#include <malloc.h>
#include <unistd.h>

namespace fs = std::filesystem;

namespace {

struct Options {
  fs::path dir = fs::temp_directory_path() / "epx-io-bench";
  int layers = 2;
  int experts = 128;
  int hidden = 2048;
  int inter = 768;
  int ranks = 4;
  int rank = 1;
  int repeat = 5;
  int shards = 4;
  bool keep = false;
  bool goal = true;      // exit 1 when load / plain < 0.8
  bool stacked = false;  // transformers 5's layout: one [E, 2I, H] and one [E, H, I] tensor per layer
};

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Resident set size and its peak, in bytes (Linux /proc/self/status).
std::uint64_t status_kb(char const* field) {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind(field, 0) == 0) return std::strtoull(line.c_str() + std::strlen(field), nullptr, 10);
  return 0;
}
// Returns freed heap to the system, then VmHWM := VmRSS.
void reset_peak_rss() {
  ::malloc_trim(0);
  std::ofstream("/proc/self/clear_refs") << "5";
}

struct PlannedTensor {
  std::string name;
  std::vector<std::int64_t> shape;
  std::uint64_t bytes = 0;
};

// Writes the checkpoint: every layer's router and experts. Per expert (the Hub's layout): expert e of
// layer l in shard (l + e) % shards. Stacked (transformers 5): layer l's two tensors in shard l % shards.
void write_checkpoint(Options const& o) {
  fs::create_directories(o.dir);
  std::vector<std::vector<PlannedTensor>> shards(static_cast<std::size_t>(o.shards));
  std::int64_t const e_ = o.experts, h = o.hidden, in = o.inter;
  for (int l = 0; l < o.layers; ++l) {
    std::string const p = "model.layers." + std::to_string(l) + ".mlp.";
    shards[static_cast<std::size_t>(l % o.shards)].push_back(
        {p + "gate.weight", {e_, h}, std::uint64_t(o.experts) * o.hidden * 2});
    if (o.stacked) {
      auto& s = shards[static_cast<std::size_t>((l + 1) % o.shards)];
      s.push_back({p + "experts.gate_up_proj", {e_, 2 * in, h}, std::uint64_t(e_ * 2 * in * h * 2)});
      s.push_back({p + "experts.down_proj", {e_, h, in}, std::uint64_t(e_ * h * in * 2)});
      continue;
    }
    for (int e = 0; e < o.experts; ++e) {
      auto& s = shards[static_cast<std::size_t>((l + e) % o.shards)];
      std::string const q = p + "experts." + std::to_string(e) + ".";
      std::uint64_t const b = std::uint64_t(o.inter) * o.hidden * 2;
      s.push_back({q + "gate_proj.weight", {in, h}, b});
      s.push_back({q + "up_proj.weight", {in, h}, b});
      s.push_back({q + "down_proj.weight", {h, in}, b});
    }
  }
  std::string weight_map;
  std::vector<std::uint16_t> chunk(std::size_t{4} << 20);  // 8 MiB of bf16 values
  std::uint64_t state = 0x9e3779b97f4a7c15ull;
  for (int s = 0; s < o.shards; ++s) {
    std::string const file = fmt::format("model-{:05d}-of-{:05d}.safetensors", s + 1, o.shards);
    std::string header = "{";
    std::uint64_t offset = 0;
    for (auto const& t : shards[static_cast<std::size_t>(s)]) {
      std::string shape;
      for (auto d : t.shape) shape += (shape.empty() ? "" : ",") + std::to_string(d);
      header += fmt::format("{}\"{}\":{{\"dtype\":\"BF16\",\"shape\":[{}],\"data_offsets\":[{},{}]}}",
                            header.size() > 1 ? "," : "", t.name, shape, offset, offset + t.bytes);
      offset += t.bytes;
      weight_map += fmt::format("{}\"{}\":\"{}\"", weight_map.empty() ? "" : ",", t.name, file);
    }
    header += "}";
    while (header.size() % 8 != 0) header += ' ';
    std::ofstream out(o.dir / file, std::ios::binary | std::ios::trunc);
    std::uint64_t const n = header.size();
    for (int i = 0; i < 8; ++i) out.put(static_cast<char>((n >> (8 * i)) & 0xff));
    out << header;
    for (std::uint64_t left = offset; left > 0;) {
      for (auto& v : chunk) {  // xorshift: small bf16 values, no NaN
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        v = static_cast<std::uint16_t>(0x3c00u | (state & 0x03ffu) | ((state >> 20) & 0x8000u));
      }
      std::uint64_t const now = std::min<std::uint64_t>(left, chunk.size() * 2);
      out.write(reinterpret_cast<char const*>(chunk.data()), static_cast<std::streamsize>(now));
      left -= now;
    }
  }
  std::ofstream(o.dir / "model.safetensors.index.json") << "{\"metadata\":{},\"weight_map\":{" << weight_map << "}}";
  std::ofstream(o.dir / "config.json") << fmt::format(
      R"({{"model_type": "qwen3_moe", "num_experts": {}, "num_experts_per_tok": 8, "hidden_size": {},
          "moe_intermediate_size": {}, "num_hidden_layers": {}, "norm_topk_prob": true}})",
      o.experts, o.hidden, o.inter, o.layers);
}

// Reads every file of the folder once (warms the page cache); returns the bytes.
std::uint64_t read_everything(fs::path const& dir) {
  std::vector<char> buffer(std::size_t{8} << 20);
  std::uint64_t total = 0;
  for (auto const& entry : fs::directory_iterator(dir)) {
    int const fd = ::open(entry.path().c_str(), O_RDONLY);
    for (ssize_t got; (got = ::read(fd, buffer.data(), buffer.size())) > 0;) total += static_cast<std::uint64_t>(got);
    ::close(fd);
  }
  return total;
}

template <class T>
struct LoadRun {
  double seconds = 0;
  std::uint64_t data_bytes = 0;
  std::uint64_t header_bytes = 0;
  std::size_t staging_bytes = 0;
  std::uint64_t peak_extra_bytes = 0;
};

// One timed load of rank o.rank's share of the last layer into `storage`.
template <class T>
LoadRun<T> time_load(Options const& o, epx::io::HostLayerStorage<T>& storage, epx::io::LayerRequest const& request) {
  reset_peak_rss();
  std::uint64_t const rss_before = status_kb("VmRSS:") * 1024;
  auto const t0 = std::chrono::steady_clock::now();
  epx::io::Checkpoint ckpt(o.dir);
  auto const model = epx::io::read_model(ckpt);
  auto const layer = epx::io::load_layer(ckpt, model, request, storage.buffers());
  LoadRun<T> run;
  run.seconds = seconds_since(t0);
  run.peak_extra_bytes = status_kb("VmHWM:") * 1024 - rss_before;
  run.data_bytes = ckpt.stats().data_bytes;
  run.header_bytes = ckpt.stats().header_bytes + ckpt.stats().index_bytes;
  run.staging_bytes = layer.staging_bytes;
  return run;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string const a = argv[i];
    auto next = [&]() -> char const* { return i + 1 < argc ? argv[++i] : "0"; };
    if (a == "--dir")
      o.dir = next();
    else if (a == "--layers")
      o.layers = std::atoi(next());
    else if (a == "--experts")
      o.experts = std::atoi(next());
    else if (a == "--hidden")
      o.hidden = std::atoi(next());
    else if (a == "--inter")
      o.inter = std::atoi(next());
    else if (a == "--ranks")
      o.ranks = std::atoi(next());
    else if (a == "--rank")
      o.rank = std::atoi(next());
    else if (a == "--repeat")
      o.repeat = std::atoi(next());
    else if (a == "--keep")
      o.keep = true;
    else if (a == "--no-goal")
      o.goal = false;  // a smoke run: small files on a busy machine
    else if (a == "--stacked")
      o.stacked = true;
    else {
      std::fprintf(stderr,
                   "usage: io_load_bench [--dir DIR] [--layers N] [--experts E] [--hidden H] [--inter I] "
                   "[--ranks R] [--rank r] [--repeat K] [--keep] [--no-goal] [--stacked]\n");
      return 2;
    }
  }
  try {
    auto t0 = std::chrono::steady_clock::now();
    if (!fs::exists(o.dir / "model.safetensors.index.json")) write_checkpoint(o);
    double const write_s = seconds_since(t0);
    t0 = std::chrono::steady_clock::now();
    std::uint64_t const total = read_everything(o.dir);
    double const warm_s = seconds_since(t0);
    std::printf(
        "checkpoint: %s, %.2f GB in %d shards (%d layers x %d experts, H %d, I %d, bf16, %s); written in "
        "%.1f s, read whole in %.2f s (%.2f GB/s, page cache warm after)\n",
        o.dir.c_str(), double(total) / 1e9, o.shards, o.layers, o.experts, o.hidden, o.inter,
        o.stacked ? "stacked" : "per expert", write_s, warm_s, double(total) / 1e9 / warm_s);

    auto const placement = epx::ExpertPlacement::contiguous(o.experts, o.ranks);
    epx::io::LayerRequest const request{.layer = o.layers - 1, .placement = placement, .rank = o.rank};
    epx::io::Checkpoint planning(o.dir);
    auto const model = epx::io::read_model(planning);
    auto const plan = epx::io::plan_layer(planning, model, request.layer, placement.local_range(o.rank));

    // bf16 -> bf16: every tensor read straight into the caller's buffers.
    epx::io::HostLayerStorage<epx::bfloat16> storage(model, request);
    for (auto* v : {&storage.gate_up, &storage.down, &storage.router_weight})  // touched: resident before timing
      std::fill(v->begin(), v->end(), epx::bfloat16(1.0f));
    std::vector<double> load_s, plain_s;
    LoadRun<epx::bfloat16> last;
    for (int k = 0; k < o.repeat; ++k) {
      last = time_load(o, storage, request);
      load_s.push_back(last.seconds);
      // The same ranges with plain pread() into the same memory: shard files opened, nothing parsed.
      auto const p0 = std::chrono::steady_clock::now();
      std::vector<int> fds(static_cast<std::size_t>(planning.num_shards()), -1);
      std::uint64_t plain_bytes = 0;
      for (auto const& job : plan.jobs) {
        auto& fd = fds[static_cast<std::size_t>(job.values.shard)];
        if (fd < 0) fd = ::open(planning.shard_path(job.values.shard).c_str(), O_RDONLY);
        // Where the slice is in the file: known from the planning checkpoint (not timed).
        auto const matrix_bytes = static_cast<std::size_t>(job.stored_rows * job.value_row_bytes());
        auto const bytes = static_cast<std::size_t>(job.count) * matrix_bytes;
        auto* dst =
            reinterpret_cast<char*>(job.buffer == epx::io::LayerBuffer::kRouterWeight ? storage.router_weight.data()
                                    : job.buffer == epx::io::LayerBuffer::kDown       ? storage.down.data()
                                                                                      : storage.gate_up.data()) +
            job.offset * 2;
        std::uint64_t const where = planning.file_offset(job.values) + std::uint64_t(job.first) * matrix_bytes;
        for (std::size_t done = 0; done < bytes;) {
          ssize_t const got = ::pread(fd, dst + done, bytes - done, static_cast<off_t>(where + done));
          if (got <= 0) throw std::runtime_error("plain pread failed");
          done += static_cast<std::size_t>(got);
        }
        plain_bytes += bytes;
      }
      for (int fd : fds)
        if (fd >= 0) ::close(fd);
      plain_s.push_back(seconds_since(p0));
      if (plain_bytes != last.data_bytes) throw std::runtime_error("plain and load read different byte counts");
    }
    std::sort(load_s.begin(), load_s.end());
    std::sort(plain_s.begin(), plain_s.end());
    double const load_med = load_s[load_s.size() / 2], plain_med = plain_s[plain_s.size() / 2];
    std::printf(
        "rank %d of %d, layer %d: %d experts, %.1f MB of tensor data (%.1f%% of the checkpoint), %.1f KB of "
        "index and headers\n",
        o.rank, o.ranks, request.layer, plan.experts.count, double(last.data_bytes) / 1e6,
        100.0 * double(last.data_bytes) / double(total), double(last.header_bytes) / 1e3);
    std::printf(
        "  load_layer bf16->bf16: median %.1f ms (%.2f GB/s); plain pread of the same ranges: median %.1f ms "
        "(%.2f GB/s); load / plain throughput = %.2f (goal >= 0.8)\n",
        load_med * 1e3, double(last.data_bytes) / 1e9 / load_med, plain_med * 1e3,
        double(last.data_bytes) / 1e9 / plain_med, plain_med / load_med);
    std::printf("  extra memory: staging %zu bytes; peak RSS above the caller's buffers %.1f MB\n", last.staging_bytes,
                double(last.peak_extra_bytes) / 1e6);

    // bf16 -> fp32: converted through the staging buffer (64 MiB by default).
    epx::io::HostLayerStorage<float> wide(model, request);
    for (auto* v : {&wide.gate_up, &wide.down, &wide.router_weight}) std::fill(v->begin(), v->end(), 1.0f);
    std::vector<double> convert_s;
    LoadRun<float> converted;
    for (int k = 0; k < o.repeat; ++k) {
      converted = time_load(o, wide, request);
      convert_s.push_back(converted.seconds);
    }
    std::sort(convert_s.begin(), convert_s.end());
    std::printf(
        "  load_layer bf16->fp32 (converting): median %.1f ms (%.2f GB/s read); staging %zu bytes; peak RSS "
        "above the caller's buffers %.1f MB\n",
        convert_s[convert_s.size() / 2] * 1e3, double(converted.data_bytes) / 1e9 / convert_s[convert_s.size() / 2],
        converted.staging_bytes, double(converted.peak_extra_bytes) / 1e6);
    if (!o.keep) fs::remove_all(o.dir);
    return !o.goal || plain_med / load_med >= 0.8 ? 0 : 1;
  } catch (std::exception const& e) {
    std::fprintf(stderr, "io_load_bench: %s\n", e.what());
    return 1;
  }
}
