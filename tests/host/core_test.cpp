// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// Core vocabulary: element types, errors, workspace carving, placement, router config, streams.

#include "../common/test_util.hpp"

#include <array>
#include <bit>
#include <cstring>
#include <iterator>
#include <string_view>
#include <utility>

using namespace epx;

namespace {

// Round-to-nearest-even float -> bf16, computed from the two neighbouring bf16 values in double.
std::uint16_t reference_bf16(float f) {
  auto const u = std::bit_cast<std::uint32_t>(f);
  std::uint32_t const lo = u & 0xffff0000u, hi = lo + 0x10000u;
  if ((lo & 0x7f800000u) == 0x7f800000u) return static_cast<std::uint16_t>(lo >> 16);  // inf stays inf
  auto value = [](std::uint32_t bits) {  // the float with these bits; the one past the largest is 2^128
    if ((bits & 0x7fffffffu) == 0x7f800000u)
      return std::copysign(std::ldexp(1.0, 128), double(std::bit_cast<float>(bits)));
    return double(std::bit_cast<float>(bits));
  };
  double const dlo = std::abs(value(lo) - f);
  double const dhi = std::abs(value(hi) - f);
  if (dlo < dhi || (dlo == dhi && ((lo >> 16) & 1u) == 0)) return static_cast<std::uint16_t>(lo >> 16);
  return static_cast<std::uint16_t>(hi >> 16);
}

std::uint16_t reference_half(float f) {
  auto const h = static_cast<_Float16>(f);  // GCC's software conversion: IEEE round-to-nearest-even
  std::uint16_t bits;
  std::memcpy(&bits, &h, 2);
  return bits;
}

}  // namespace

TEST_CASE("DType::half: every half survives a round trip through float") {
  for (std::uint32_t b = 0; b <= 0xffffu; ++b) {
    auto const h = half::from_bits(static_cast<std::uint16_t>(b));
    float const f = static_cast<float>(h);
    std::uint16_t expected_bits;
    auto const ref = static_cast<_Float16>(f);
    std::memcpy(&expected_bits, &ref, 2);
    if (std::isnan(f)) {
      CHECK(std::isnan(static_cast<float>(half(f))));
      continue;
    }
    REQUIRE_MESSAGE(half(f).bits == b, "bits " << b);
    CHECK(reference_half(f) == b);  // and half -> float agrees with the compiler's
  }
}

TEST_CASE("DType::half: float to half rounds to nearest even like the compiler") {
  EPX_TEST_SEEDED_RNG(rng);
  std::uniform_int_distribution<std::uint32_t> any_bits;
  std::uniform_real_distribution<float> near_range(-70000.0f, 70000.0f);
  for (int i = 0; i < 1'000'000; ++i) {
    float f = i % 2 ? std::bit_cast<float>(any_bits(rng)) : near_range(rng) * std::ldexp(1.0f, -(i % 40));
    if (std::isnan(f)) continue;
    REQUIRE_MESSAGE(half(f).bits == reference_half(f), "f = " << f);
  }
  // The edges: largest half, the overflow threshold, subnormals and the underflow threshold.
  for (float f :
       {65504.0f, 65519.99f, 65520.0f, 6.1035156e-05f, 5.9604645e-08f, 2.9802322e-08f, 2.9802326e-08f, -0.0f, 1e-30f})
    CHECK_MESSAGE(half(f).bits == reference_half(f), "f = " << f);
}

TEST_CASE("DType::bfloat16: float to bf16 rounds to nearest even") {
  EPX_TEST_SEEDED_RNG(rng);
  std::uniform_int_distribution<std::uint32_t> any_bits;
  for (int i = 0; i < 1'000'000; ++i) {
    float const f = std::bit_cast<float>(any_bits(rng));
    if (std::isnan(f)) {
      CHECK(std::isnan(static_cast<float>(bfloat16(f))));
      continue;
    }
    REQUIRE_MESSAGE(bfloat16(f).bits == reference_bf16(f), "f = " << f);
  }
  for (std::uint32_t b = 0; b <= 0xffffu; ++b) {
    float const f = bfloat16::to_float(static_cast<std::uint16_t>(b));
    if (!std::isnan(f)) REQUIRE(bfloat16(f).bits == b);
  }
  CHECK(bfloat16(1.00390625f).bits == bfloat16(1.0f).bits);  // tie, 1.0 is even
  CHECK(bfloat16(3.4e38f).bits == 0x7f80u);                  // rounds past the largest bf16 to inf
}

TEST_CASE("Error::message: names the parameter, its value, the expectation and the location") {
  try {
    detail::require(false, Errc::kInvalidArgument, "route", "top_k", 9, "in [1, 8]");
    FAIL("no throw");
  } catch (Error const& e) {
    CHECK(e.code() == Errc::kInvalidArgument);
    std::string const msg = e.what();
    CHECK(msg.find("epx: route: top_k = 9, expected in [1, 8]") == 0);
    CHECK(msg.find("core_test.cpp:") != std::string::npos);
  }
}

TEST_CASE("Errc::to_string: prints the enumerator's name") {
  // Every enumerator, spelled as in the source: a log line can be searched for in code and docs.
  std::pair<Errc, std::string_view> const names[] = {{Errc::kInvalidArgument, "kInvalidArgument"},
                                                     {Errc::kShapeMismatch, "kShapeMismatch"},
                                                     {Errc::kWorkspaceTooSmall, "kWorkspaceTooSmall"},
                                                     {Errc::kInvalidExpertId, "kInvalidExpertId"},
                                                     {Errc::kTimeout, "kTimeout"},
                                                     {Errc::kPeerFailed, "kPeerFailed"},
                                                     {Errc::kCollectiveMismatch, "kCollectiveMismatch"},
                                                     {Errc::kUnsupported, "kUnsupported"},
                                                     {Errc::kCuda, "kCuda"},
                                                     {Errc::kNccl, "kNccl"}};
  for (auto const& entry : names) {  // not a structured binding: clang 14 cannot CAPTURE one
    CAPTURE(entry.second);
    CHECK(to_string(entry.first) == entry.second);
  }
  CHECK(static_cast<int>(Errc::kNccl) + 1 == static_cast<int>(std::size(names)));  // no enumerator left out
  CHECK(to_string(static_cast<Errc>(99)) == "unknown");
  static_assert(to_string(Errc::kShapeMismatch) == "kShapeMismatch");  // usable in constant expressions
}

TEST_CASE("Status::merge: counters add up, the largest expert load is kept, ok() ignores tokens without expert") {
  EPX_TEST_SEEDED_RNG(rng);
  std::uniform_int_distribution<std::uint32_t> count(1, 1000);
  Status a, b;
  a.invalid_ids = 0;
  a.tokens_without_expert = count(rng);
  a.max_tokens_per_expert = count(rng);
  b.tokens_without_expert = count(rng);
  b.max_tokens_per_expert = count(rng);
  b.dropped_slots = count(rng);
  Status const before = a;
  CHECK(a.ok());  // padding alone is not a failure
  a.merge(b);
  CHECK(a.tokens_without_expert == before.tokens_without_expert + b.tokens_without_expert);
  CHECK(a.dropped_slots == b.dropped_slots);
  CHECK(a.max_tokens_per_expert == std::max(before.max_tokens_per_expert, b.max_tokens_per_expert));
  CHECK_FALSE(a.ok());
}

TEST_CASE("TensorView: extents, strides and contiguity as torch reports them") {
  EPX_TEST_SEEDED_RNG(rng);
  std::uniform_int_distribution<std::int64_t> extent(2, 9);
  std::int64_t const e = extent(rng), r = extent(rng), c = extent(rng);
  CAPTURE(e);
  CAPTURE(r);
  CAPTURE(c);
  std::vector<float> buffer(static_cast<std::size_t>(e * r * c));
  TensorView dense(buffer.data(), {e, r, c});  // deduced: TensorView<float, 3>, row-major strides
  static_assert(std::is_same_v<decltype(dense), TensorView<float, 3>>);
  CHECK(dense.strides == std::array<std::int64_t, 3>{r * c, c, 1});
  CHECK(dense.is_contiguous());
  CHECK(dense.size() == e * r * c);
  TensorView<float const, 3> const as_const = dense;  // mutable -> const converts implicitly
  CHECK(as_const.data == buffer.data());
  auto const shape = as_const.shape();
  CHECK(shape.rank == 3);
  CHECK(std::equal(shape.extent_list().begin(), shape.extent_list().end(), dense.extents.begin()));
  CHECK(std::equal(shape.stride_list().begin(), shape.stride_list().end(), dense.strides.begin()));
  // torch's w.transpose(1, 2) of a contiguous [e, c, r]: extents [e, r, c], strides [c * r, 1, r].
  TensorView transposed(buffer.data(), {e, r, c}, {c * r, 1, r});
  CHECK_FALSE(transposed.is_contiguous());
  // A slice keeping every other row: right extents, row stride doubled.
  CHECK_FALSE(TensorView(buffer.data(), {e, r / 2, c}, {r * c, 2 * c, 1}).is_contiguous());
  // The stride of a dimension of extent 1 is never used (torch: is_contiguous() ignores it), and a
  // tensor with no elements is contiguous.
  CHECK(TensorView(buffer.data(), {1, r, c}, {12345, c, 1}).is_contiguous());
  CHECK(TensorView(buffer.data(), {e, 1, c}, {c, 7, 1}).is_contiguous());
  CHECK(TensorView(buffer.data(), {0, r, c}, {1, 1, 1}).is_contiguous());
  TensorView bias(buffer.data(), {e, r});
  CHECK(bias.strides == std::array<std::int64_t, 2>{r, 1});
  CHECK(TensorView<float, 2>().shape().rank == 2);
  CHECK_FALSE(TensorShape{}.known());
}

TEST_CASE("Workspace::carve: parts are aligned and a small workspace names both sizes") {
  auto layout = [](auto& c) {
    auto a = c.template take<float>(3);
    auto b = c.template take<std::int32_t>(100);
    return std::make_pair(a, b);
  };
  std::size_t const need = detail::layout_bytes(layout);
  CHECK(need == 256 + 512 + 255);
  std::vector<std::byte> mem(need + 100);
  for (std::size_t shift : {0, 1, 7, 100}) {  // any base address works with workspace_bytes bytes
    auto const [a, b] = detail::carve_layout(Workspace(mem.data() + shift, need), "t", layout);
    CHECK(reinterpret_cast<std::uintptr_t>(a.data()) % 256 == 0);
    CHECK(reinterpret_cast<std::uintptr_t>(b.data()) % 256 == 0);
    CHECK(a.size() == 3);
    CHECK(b.size() == 100);
    CHECK(reinterpret_cast<std::byte*>(b.data() + 100) <= mem.data() + shift + need);
  }
  CHECK_THROWS_WITH_AS(
      detail::carve_layout(Workspace(mem.data(), need - 1), "permute", layout),
      doctest::Contains(
          fmt::format("permute: workspace.size() = {} bytes, expected at least {} bytes", need - 1, need).c_str()),
      Error);
  CHECK_THROWS_AS(detail::carve_layout(Workspace(nullptr, need), "x", layout), Error);
}

TEST_CASE("ExpertPlacement::contiguous: uneven sizes when experts do not divide ranks") {
  auto const p = ExpertPlacement::contiguous(10, 4);
  CHECK(p.num_ranks() == 4);
  CHECK(p.num_experts() == 10);
  std::vector<std::int32_t> sizes, firsts;
  for (int r = 0; r < 4; ++r) {
    sizes.push_back(p.num_local_experts(r));
    firsts.push_back(p.first_expert(r));
  }
  CHECK(sizes == std::vector<std::int32_t>{3, 3, 2, 2});
  CHECK(firsts == std::vector<std::int32_t>{0, 3, 6, 8});
  CHECK(p.max_local_experts() == 3);
  for (int e = 0; e < 10; ++e) CHECK(p.local_range(p.rank_of(e)).contains(e));
}

TEST_CASE("ExpertPlacement::rank_of: skips ranks without experts") {
  std::vector<std::int32_t> const counts{0, 2, 0, 0, 3, 0};
  auto const p = ExpertPlacement::from_counts(counts);
  CHECK(p.rank_of(0) == 1);
  CHECK(p.rank_of(1) == 1);
  CHECK(p.rank_of(2) == 4);
  CHECK(p.rank_of(4) == 4);
  auto const many = ExpertPlacement::contiguous(3, 8);  // more ranks than experts
  CHECK(many.num_local_experts(2) == 1);
  CHECK(many.num_local_experts(3) == 0);
  CHECK_THROWS_WITH_AS((void)p.rank_of(5), doctest::Contains("expert_idx = 5, expected in [0, 5)"), Error);
  CHECK_THROWS_WITH_AS(ExpertPlacement::contiguous(0, 2), doctest::Contains("num_experts = 0"), Error);
  std::vector<std::int32_t> const negative{2, -1};
  CHECK_THROWS_WITH_AS(ExpertPlacement::from_counts(negative), doctest::Contains("experts_per_rank[1] = -1"), Error);
}

TEST_CASE("RouterConfig::validate: each bad field is named") {
  RouterConfig const good{
      .num_experts = 256, .top_k = 8, .scoring = Scoring::kSigmoidTopK, .num_groups = 8, .topk_groups = 4};
  CHECK_NOTHROW(detail::validate(good));
  auto expect = [](RouterConfig c, char const* text) {
    CHECK_THROWS_WITH_AS(detail::validate(c), doctest::Contains(text), Error);
  };
  expect({.num_experts = 0, .top_k = 1}, "num_experts = 0, expected > 0");
  expect({.num_experts = 8, .top_k = 9}, "top_k = 9, expected in [1, min(num_experts = 8");
  expect({.num_experts = 8, .top_k = 0}, "top_k = 0");
  expect({.num_experts = 10, .top_k = 2, .num_groups = 4},
         "num_groups = 4, expected >= 1 and dividing num_experts = 10");
  expect({.num_experts = 8, .top_k = 2, .num_groups = 4, .topk_groups = 5}, "topk_groups = 5");
  expect({.num_experts = 8, .top_k = 4, .num_groups = 4, .topk_groups = 1}, "expected >= top_k = 4");
  expect({.num_experts = 8, .top_k = 2, .routed_scaling_factor = NAN}, "routed_scaling_factor = nan");
}

TEST_CASE("StreamRef: refuses the legacy default stream") {
  CHECK(StreamRef::host().is_host());
  CHECK_THROWS_WITH_AS(StreamRef(static_cast<CUstream_st*>(nullptr)), doctest::Contains("legacy default stream"),
                       Error);
  CHECK_THROWS_WITH_AS(StreamRef(reinterpret_cast<CUstream_st*>(std::uintptr_t{0x1})),  // cudaStreamLegacy
                       doctest::Contains("stream = cudaStreamLegacy"), Error);
  auto* fake = reinterpret_cast<CUstream_st*>(std::uintptr_t{0x2});  // cudaStreamPerThread's value
  CHECK_FALSE(StreamRef(fake).is_host());
}

TEST_CASE("Math::bit_width: bits of the largest key") {
  CHECK(bit_width(0) == 0);
  CHECK(bit_width(1) == 1);
  CHECK(bit_width(7) == 3);
  CHECK(bit_width(8) == 4);
  CHECK(bit_width(256) == 9);
  CHECK(ceil_div(7, 2) == 4);
  CHECK(align_up<std::size_t>(257, 256) == 512);
}

TEST_CASE("ExpertPlacement::from_counts: a total past int32 is refused") {
  std::vector<std::int32_t> const huge{std::numeric_limits<std::int32_t>::max(), 1};
  CHECK_THROWS_WITH_AS(ExpertPlacement::from_counts(huge),
                       doctest::Contains("sum(experts_per_rank) = 2147483648, expected < 2^31"), Error);
}
