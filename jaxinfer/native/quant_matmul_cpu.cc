// y[M, N] = x[M, K] @ W[K, N] for a packed weight on an x86-64 CPU with AVX2 + FMA + F16C, as an XLA FFI
// custom call (quant_matmul_cpu.py beside it builds and registers it).
//
// W is jaxinfer's canonical packed layout (jaxinfer/quantization/weight.py), read as stored:
//   bits=4  codes int32 [K/8, N], row k in nibble k%8 of word k/8; u in [0, 16)
//   bits=8  codes int8  [K, N] holding u - 128
//   scales  [G, N] and optional offsets [G, N] (f16 / bf16 / f32), G = K / group_size
//   W[k, n] = u * s + offset, or (u - 2^(bits-1)) * s without offsets (symmetric).
//
// Weight-only: x stays f32 and every code is converted to f32 in registers, so the result is the dequantized
// float matmul up to the order of the f32 additions. Per block of rows (a group, or a part of one) and
// 16-column strip it accumulates sum_k x * code in registers, then adds scale * that + b * sum_k x, where b is
// the group's additive term (the offset; -8 * scale for symmetric 4-bit codes, read unsigned; +128 * scale for
// asymmetric 8-bit codes, read signed) and sum_k x the activations' per-block sums. Up to kMaxRows rows of x
// use each code as it is converted; more rows convert each block x strip once into an L1 buffer and run a
// 6-row micro-kernel over it. Every row gets the same FMAs in the same order whatever the batch, so a row's
// result does not depend on the other rows (batch invariant).
//
// Work: tiles of whole rows where N is small (the weight read front to back; the blocks split between
// threads, partial sums added at the end), column tiles of kWideTileN otherwise. Tiles are claimed by the
// calling thread and by tasks on XLA's intra-op pool; the caller never waits on a task that has not started
// (it claims the remaining tiles itself), so a busy or one-thread pool cannot deadlock it.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kStrip = 16;        // columns held in registers: two AVX2 vectors of f32
constexpr int64_t kWholeRowN = 2048;  // up to this N a tile spans whole rows
constexpr int64_t kWideTileN = 1024;  // otherwise tiles of this many columns (4 KB runs of 4-bit words)
constexpr int kMaxRows = 4;           // rows of x sharing codes converted in registers
constexpr int64_t kMaxBlock = 256;    // rows of codes accumulated before scaling (a group, or a part of one)
constexpr int64_t kChunkN = 256;      // columns whose running sums the many-rows path keeps, for every row

struct BF16 {
  uint16_t bits;
};

inline __m256 Load8(const float* v) { return _mm256_loadu_ps(v); }
inline __m256 Load8(const _Float16* v) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v)));
}
inline __m256 Load8(const BF16* v) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

struct Problem {
  const float* x;       // [M, K]
  const void* codes;    // int32 [K/8, N] or int8 [K, N]
  const void* scales;   // [G, N]
  const void* offsets;  // [G, N] or nullptr
  const float* xsum;    // [M, K / block] per-block sums of x, or nullptr (symmetric 8-bit: no additive term)
  int64_t M, K, N, group_size;
  int64_t block;  // rows accumulated in registers before scaling: the group size or a divisor of it
};

struct Tile {
  int64_t n_begin, n_end, b_begin, b_end;  // columns, and blocks of `block` rows
  float* out;  // [M, N] (y itself, or a partial sum to add to it)
};

// Calls f(k, c0, c1) for k = 0 .. block-1 with the codes of rows k0 + k, columns [n, n + 16) as f32 (c0: the
// first 8 columns, c1: the next 8), in row order.
template <int BITS, typename F>
inline void ForEachCodeRow(const Problem& p, int64_t k0, int64_t n, F&& f) {
  if constexpr (BITS == 4) {
    const __m256i low4 = _mm256_set1_epi32(0xF);
    const int32_t* row = static_cast<const int32_t*>(p.codes) + (k0 / 8) * p.N + n;
    for (int64_t kw = 0; kw < p.block / 8; ++kw, row += p.N) {
      __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row));
      __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 8));
      for (int j = 0; j < 8; ++j) {  // nibble j of each word is row 8 * kw + j
        f(8 * kw + j, _mm256_cvtepi32_ps(_mm256_and_si256(w0, low4)), _mm256_cvtepi32_ps(_mm256_and_si256(w1, low4)));
        w0 = _mm256_srli_epi32(w0, 4);
        w1 = _mm256_srli_epi32(w1, 4);
      }
    }
  } else {
    const int8_t* row = static_cast<const int8_t*>(p.codes) + k0 * p.N + n;
    for (int64_t k = 0; k < p.block; ++k, row += p.N) {
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row));
      f(k, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)),
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(bytes, 8))));
    }
  }
}

// acc[r] = sum_k x[m0 + r, k0 + k] * c(k) for r < MR, each code row used as it is converted.
template <int BITS, int MR>
inline void AccumulateStrip(const Problem& p, int64_t m0, int64_t k0, int64_t n, __m256 (&acc)[MR][2]) {
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  const float* xk = p.x + m0 * p.K + k0;
  ForEachCodeRow<BITS>(p, k0, n, [&](int64_t k, __m256 c0, __m256 c1) {
    for (int r = 0; r < MR; ++r) {
      const __m256 xv = _mm256_broadcast_ss(xk + r * p.K + k);
      acc[r][0] = _mm256_fmadd_ps(xv, c0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(xv, c1, acc[r][1]);
    }
  });
}

// Block x strip codes converted to f32 once, for batches of more than kMaxRows rows: buf[k * 16 + j].
template <int BITS>
inline void DecodeStrip(const Problem& p, int64_t k0, int64_t n, float* buf) {
  ForEachCodeRow<BITS>(p, k0, n, [buf](int64_t k, __m256 c0, __m256 c1) {
    _mm256_store_ps(buf + k * kStrip, c0);
    _mm256_store_ps(buf + k * kStrip + 8, c1);
  });
}

// AccumulateStrip's sums from decoded codes: the same FMAs in the same order, so the same bits.
template <int MR>
inline void AccumulateDecoded(const Problem& p, int64_t m0, int64_t k0, const float* buf, __m256 (&acc)[MR][2]) {
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  const float* xk = p.x + m0 * p.K + k0;
  for (int64_t k = 0; k < p.block; ++k, buf += kStrip) {
    const __m256 c0 = _mm256_load_ps(buf), c1 = _mm256_load_ps(buf + 8);
    for (int r = 0; r < MR; ++r) {
      const __m256 xv = _mm256_broadcast_ss(xk + r * p.K + k);
      acc[r][0] = _mm256_fmadd_ps(xv, c0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(xv, c1, acc[r][1]);
    }
  }
}

// total[r][col - n_begin] += scale * acc + b * (block sum of x) for block i and the strip at column n.
// (g: the block's group; blocks: K / block, passed in to keep integer divisions out of the strip loop.)
template <int BITS, int MR, typename S, typename B>
inline void Fold(const Problem& p, int64_t i, int64_t g, int64_t blocks, int64_t n, int64_t m0,
                 const __m256 (&acc)[MR][2], float* total, int64_t stride, int64_t n_begin) {
  const S* scales = static_cast<const S*>(p.scales);
  const B* offsets = static_cast<const B*>(p.offsets);
  for (int h = 0; h < 2; ++h) {
    const int64_t col = n + 8 * h;
    const __m256 s = Load8(scales + g * p.N + col);
    __m256 b = _mm256_setzero_ps();
    if (BITS == 4 && offsets == nullptr) b = _mm256_mul_ps(s, _mm256_set1_ps(-8.0f));
    if (offsets != nullptr) {
      b = Load8(offsets + g * p.N + col);
      if (BITS == 8) b = _mm256_fmadd_ps(s, _mm256_set1_ps(128.0f), b);
    }
    for (int r = 0; r < MR; ++r) {
      float* t = total + r * stride + (col - n_begin);
      __m256 v = _mm256_fmadd_ps(s, acc[r][h], _mm256_loadu_ps(t));
      if (p.xsum != nullptr) v = _mm256_fmadd_ps(b, _mm256_broadcast_ss(p.xsum + (m0 + r) * blocks + i), v);
      _mm256_storeu_ps(t, v);
    }
  }
}

// Up to kMaxRows rows [m0, m0 + MR): codes converted in registers as they are used.
template <int BITS, int MR, typename S, typename B>
void RunTileFewRows(const Problem& p, const Tile& tile, int64_t m0) {
  const int64_t width = tile.n_end - tile.n_begin;
  alignas(32) float total[MR][kWholeRowN];
  for (int r = 0; r < MR; ++r) std::fill_n(total[r], width, 0.0f);
  const int64_t blocks = p.K / p.block;
  for (int64_t i = tile.b_begin; i < tile.b_end; ++i) {
    const int64_t g = i * p.block / p.group_size;
    for (int64_t n = tile.n_begin; n < tile.n_end; n += kStrip) {
      __m256 acc[MR][2];
      AccumulateStrip<BITS, MR>(p, m0, i * p.block, n, acc);
      Fold<BITS, MR, S, B>(p, i, g, blocks, n, m0, acc, total[0], kWholeRowN, tile.n_begin);
    }
  }
  for (int r = 0; r < MR; ++r) std::memcpy(tile.out + (m0 + r) * p.N + tile.n_begin, total[r], sizeof(float) * width);
}

template <int BITS, int MR, typename S, typename B>
inline void AccumulateAndFold(const Problem& p, int64_t i, int64_t g, int64_t blocks, int64_t n, int64_t m0,
                              const float* buf, float* total, int64_t width, int64_t c0) {
  __m256 acc[MR][2];
  AccumulateDecoded<MR>(p, m0, i * p.block, buf, acc);
  Fold<BITS, MR, S, B>(p, i, g, blocks, n, m0, acc, total + m0 * width, width, c0);
}

template <int BITS, typename S, typename B>
void RunTileAllRows(const Problem& p, const Tile& tile) {
  if (p.M <= kMaxRows) {
    int64_t m = 0;
    for (; m + 4 <= p.M; m += 4) RunTileFewRows<BITS, 4, S, B>(p, tile, m);
    for (; m + 2 <= p.M; m += 2) RunTileFewRows<BITS, 2, S, B>(p, tile, m);
    for (; m < p.M; ++m) RunTileFewRows<BITS, 1, S, B>(p, tile, m);
    return;
  }
  // More rows: each block x strip of codes is converted once and used by every row, in chunks of kChunkN
  // columns so that the running sums of every row stay in L2 while the codes are still read in runs.
  const int64_t blocks = p.K / p.block;
  std::vector<float> total(p.M * kChunkN);
  alignas(32) float buf[kMaxBlock * kStrip];
  for (int64_t c0 = tile.n_begin; c0 < tile.n_end; c0 += kChunkN) {
    const int64_t c1 = std::min(tile.n_end, c0 + kChunkN), width = c1 - c0;
    std::fill(total.begin(), total.end(), 0.0f);
    for (int64_t i = tile.b_begin; i < tile.b_end; ++i) {
      const int64_t g = i * p.block / p.group_size;
      for (int64_t n = c0; n < c1; n += kStrip) {
        DecodeStrip<BITS>(p, i * p.block, n, buf);
        int64_t m = 0;
        for (; m + 6 <= p.M; m += 6) AccumulateAndFold<BITS, 6, S, B>(p, i, g, blocks, n, m, buf, total.data(), width, c0);
        for (; m + 4 <= p.M; m += 4) AccumulateAndFold<BITS, 4, S, B>(p, i, g, blocks, n, m, buf, total.data(), width, c0);
        for (; m + 2 <= p.M; m += 2) AccumulateAndFold<BITS, 2, S, B>(p, i, g, blocks, n, m, buf, total.data(), width, c0);
        for (; m < p.M; ++m) AccumulateAndFold<BITS, 1, S, B>(p, i, g, blocks, n, m, buf, total.data(), width, c0);
      }
    }
    for (int64_t m = 0; m < p.M; ++m)
      std::memcpy(tile.out + m * p.N + c0, total.data() + m * width, sizeof(float) * width);
  }
}

using TileFn = void (*)(const Problem&, const Tile&);

template <int BITS, typename S>
TileFn PickOffsets(ffi::DataType offsets, bool has_offsets) {
  if (!has_offsets) return &RunTileAllRows<BITS, S, float>;
  switch (offsets) {
    case ffi::DataType::F32: return &RunTileAllRows<BITS, S, float>;
    case ffi::DataType::F16: return &RunTileAllRows<BITS, S, _Float16>;
    case ffi::DataType::BF16: return &RunTileAllRows<BITS, S, BF16>;
    default: return nullptr;
  }
}

template <int BITS>
TileFn PickScales(ffi::DataType scales, ffi::DataType offsets, bool has_offsets) {
  switch (scales) {
    case ffi::DataType::F32: return PickOffsets<BITS, float>(offsets, has_offsets);
    case ffi::DataType::F16: return PickOffsets<BITS, _Float16>(offsets, has_offsets);
    case ffi::DataType::BF16: return PickOffsets<BITS, BF16>(offsets, has_offsets);
    default: return nullptr;
  }
}

// Runs fn(i) for i in [0, count) on the calling thread and up to `helpers` pool tasks; returns when all ran.
template <typename Fn>
void ParallelFor(ffi::ThreadPool& pool, int64_t count, int64_t helpers, Fn fn) {
  struct Shared {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto shared = std::make_shared<Shared>();
  auto work = [shared, count, fn]() {
    for (int64_t i; (i = shared->next.fetch_add(1)) < count;) {
      fn(i);
      shared->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([work] { work(); });
  work();
  while (shared->done.load(std::memory_order_acquire) < count) std::this_thread::yield();
}

ffi::Error QuantMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer codes, ffi::AnyBuffer scales,
                       ffi::AnyBuffer offsets, ffi::ResultBuffer<ffi::F32> y, int32_t bits, int32_t group_size,
                       bool has_offsets) {
  const auto xd = x.dimensions();
  const auto cd = codes.dimensions();
  if (xd.size() != 2 || cd.size() != 2) return ffi::Error::InvalidArgument("x and codes must be rank 2");
  Problem p{x.typed_data(), codes.untyped_data(), scales.untyped_data(),
            has_offsets ? offsets.untyped_data() : nullptr, nullptr, xd[0], xd[1], cd[1], group_size, group_size};
  if (bits == 4 ? (codes.element_type() != ffi::DataType::S32 || cd[0] * 8 != p.K)
                : (bits != 8 || codes.element_type() != ffi::DataType::S8 || cd[0] != p.K))
    return ffi::Error::InvalidArgument("codes do not match bits and x's last dimension");
  if (group_size <= 0 || p.K % group_size != 0 || (bits == 4 && group_size % 8 != 0) || p.N % kStrip != 0)
    return ffi::Error::InvalidArgument("the group size must divide K (4-bit: in whole words) and N must be a "
                                       "multiple of 16");
  const auto sd = scales.dimensions();
  const auto od = offsets.dimensions();
  if (sd.size() != 2 || sd[0] * group_size != p.K || sd[1] != p.N ||
      (has_offsets && (od.size() != 2 || od[0] != sd[0] || od[1] != p.N)))
    return ffi::Error::InvalidArgument("scales (and offsets) must be [K / group_size, N]");
  const TileFn fn = bits == 4 ? PickScales<4>(scales.element_type(), offsets.element_type(), has_offsets)
                              : PickScales<8>(scales.element_type(), offsets.element_type(), has_offsets);
  if (fn == nullptr) return ffi::Error::InvalidArgument("scales and offsets must be f32, f16 or bf16");

  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t G = p.K / group_size;
  // Blocks: the group, or a part of it when there are fewer groups than threads (per-channel scales) or a group
  // is longer than kMaxBlock. Exact by linearity: scale * (sum of block sums) = sum of scale * block sum.
  const int64_t align = bits == 4 ? 8 : 1;
  p.block = align;
  for (int64_t b = std::min<int64_t>(group_size, kMaxBlock); b >= align; --b) {
    if (group_size % b == 0 && b % align == 0 && (G * (group_size / b) >= threads || b == align)) {
      p.block = b;
      break;
    }
  }
  const int64_t blocks = p.K / p.block;
  std::vector<float> xsum;
  if (has_offsets || bits == 4) {
    xsum.assign(p.M * blocks, 0.0f);
    for (int64_t m = 0; m < p.M; ++m)
      for (int64_t k = 0; k < p.K; ++k) xsum[m * blocks + k / p.block] += p.x[m * p.K + k];
    p.xsum = xsum.data();
  }

  float* out = y->typed_data();
  std::vector<Tile> tiles;
  std::vector<float> partials;
  if (p.N <= kWholeRowN) {  // whole rows, the blocks split between threads, each part's sum added at the end
    const int64_t parts = std::min(threads, blocks);
    partials.assign((parts - 1) * p.M * p.N, 0.0f);
    for (int64_t i = 0; i < parts; ++i)
      tiles.push_back({0, p.N, blocks * i / parts, blocks * (i + 1) / parts,
                       i == 0 ? out : partials.data() + (i - 1) * p.M * p.N});
  } else {
    for (int64_t n = 0; n < p.N; n += kWideTileN) tiles.push_back({n, std::min(p.N, n + kWideTileN), 0, blocks, out});
  }
  const int64_t count = tiles.size();
  ParallelFor(pool, count, std::min(threads, count) - 1, [&](int64_t i) { fn(p, tiles[i]); });
  for (size_t i = 0; i < partials.size(); ++i) out[i % (p.M * p.N)] += partials[i];
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferQuantMatmul, QuantMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [M, K]
                                  .Arg<ffi::AnyBuffer>()         // codes
                                  .Arg<ffi::AnyBuffer>()         // scales
                                  .Arg<ffi::AnyBuffer>()         // offsets (ignored unless has_offsets)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y [M, N]
                                  .Attr<int32_t>("bits")
                                  .Attr<int32_t>("group_size")
                                  .Attr<bool>("has_offsets"));
