// Top-k over the last axis of a float32 array, as XLA FFI custom calls for the CPU: of the array
// itself, or of ReLU(z + bias) * scale (a TopK SAE's scores) without writing those scores out.
//
// Same result as jax.lax.top_k, index for index: values in descending order under XLA's total
// order (the float bits read as a sign-magnitude integer, so -0.0 < +0.0 and NaN above +inf),
// ties broken by the lower index. XLA's own CPU top-k sorts every row partially, one row at a
// time on one thread; here each row is one pass that keeps a buffer of the best candidates and
// skips, with one vector compare, every 16-wide block with nothing above its floor, and blocks of rows share XLA's threads.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <utility>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// A candidate packed so that a larger integer ranks first: the order key (sign bit flipped, so it
// compares unsigned) above the complemented index (a lower index wins a tie).
using Cand = uint64_t;

inline int32_t OrderKey(float v) {
  int32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return bits ^ ((bits >> 31) & 0x7fffffff);
}

inline Cand Pack(int32_t key, int64_t index) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(key) ^ 0x80000000u) << 32) |
         (0xffffffffu - static_cast<uint32_t>(index));
}
inline int32_t KeyOf(Cand c) { return static_cast<int32_t>(static_cast<uint32_t>(c >> 32) ^ 0x80000000u); }
inline int32_t IndexOf(Cand c) { return static_cast<int32_t>(0xffffffffu - static_cast<uint32_t>(c)); }

constexpr int64_t kBlock = 16;

// Candidates first taken unconditionally, and the buffer size that triggers a Shrink after that.
inline int64_t HeadSize(int64_t n, int64_t k) { return std::max(k, std::min(n, 8 * k)); }
inline int64_t Capacity(int64_t k) { return std::max<int64_t>(4 * k, 64); }

// Keeps the k best of buf and returns the key of the k-th: a later element (larger index) enters
// only with a strictly larger key.
int32_t Shrink(std::vector<Cand>& buf, int64_t k) {
  std::nth_element(buf.begin(), buf.begin() + (k - 1), buf.end(), std::greater<Cand>());
  buf.resize(k);
  return KeyOf(buf[k - 1]);  // nth_element put the k-th best there
}

// The plain score, and ReLU(z + bias) * scale per latent as XLA computes it (NaN propagates, and
// ReLU(-0.0) stays -0.0). Fill writes the scores of elements [start, start + len) of a row.
struct Plain {
  void Fill(const float* __restrict x, int64_t start, int64_t len, float* __restrict out) const {
    std::memcpy(out, x + start, len * sizeof(float));
  }
};
struct ReluAffine {
  const float* bias;
  const float* scale;
  void Fill(const float* __restrict x, int64_t start, int64_t len, float* __restrict out) const {
    const float* __restrict b = bias + start;
    const float* __restrict s = scale + start;
    x += start;
#pragma omp simd
    for (int64_t t = 0; t < len; ++t) out[t] = std::max(x[t] + b[t], 0.0f) * s[t];
  }
};

constexpr int64_t kTile = 256;  // scores computed per pass, kept in L1

template <typename Score>
void RowTopK(const float* x, const Score& score, int64_t n, int64_t k, float* vals, int32_t* idx,
             std::vector<Cand>& buf) {
  const int64_t cap = Capacity(k);
  alignas(64) float tile[kTile];
  alignas(64) int32_t keys[kTile];
  alignas(64) uint8_t hit[kTile];
  buf.clear();
  int32_t floor = INT32_MIN;
  // The first `head` elements all enter; the k-th best of them is a high first floor, so few
  // later elements pass it (about k ln(n / head) of them in a random order).
  const int64_t head = HeadSize(n, k);
  bool filling = true;
  for (int64_t start = 0; start < n; start += kTile) {
    const int64_t len = std::min(kTile, n - start);
    score.Fill(x, start, len, tile);
#pragma omp simd
    for (int64_t t = 0; t < len; ++t) keys[t] = OrderKey(tile[t]);
    // One vectorised compare against the floor at the tile's start (the floor only rises), then
    // only 16-wide blocks with a hit are looked at one by one.
    const int32_t entry = floor;
#pragma omp simd
    for (int64_t t = 0; t < len; ++t) hit[t] = keys[t] > entry;
    std::fill(hit + len, hit + kTile, 0);
    for (int64_t b = 0; b < len; b += kBlock) {
      uint64_t lo, hi;
      std::memcpy(&lo, hit + b, 8);
      std::memcpy(&hi, hit + b + 8, 8);
      if (filling) {
        lo = hi = 0x0101010101010101ull;
      } else if ((lo | hi) == 0) {
        continue;
      }
      // 0/1 bytes to bits (byte i lands on bit i of the top byte): bit t is element b + t
      uint32_t mask = static_cast<uint32_t>((lo * 0x0102040810204080ull) >> 56) |
                      static_cast<uint32_t>((hi * 0x0102040810204080ull) >> 56) << 8;
      mask &= len - b >= kBlock ? 0xffffu : (1u << (len - b)) - 1;
      for (; mask != 0; mask &= mask - 1) {
        const int64_t t = b + __builtin_ctz(mask);
        if (!filling && keys[t] <= floor) continue;
        buf.push_back(Pack(keys[t], start + t));
        if (filling) {
          if (start + t + 1 == head) {
            filling = false;
            floor = Shrink(buf, k);
          }
        } else if (static_cast<int64_t>(buf.size()) >= cap) {
          floor = Shrink(buf, k);
        }
      }
    }
  }
  if (static_cast<int64_t>(buf.size()) > k) Shrink(buf, k);
  std::sort(buf.begin(), buf.end(), std::greater<Cand>());
  for (int64_t t = 0; t < k; ++t) {
    idx[t] = IndexOf(buf[t]);
    score.Fill(x, idx[t], 1, vals + t);
  }
}

template <typename Score>
ffi::Error Run(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& x, const Score& score,
               ffi::ResultBuffer<ffi::F32>& vals, ffi::ResultBuffer<ffi::S32>& idx, int64_t k) {
  const auto dims = x.dimensions();
  if (dims.size() == 0) return ffi::Error::InvalidArgument("top_k needs at least one axis");
  const int64_t n = dims.back();
  if (k < 1 || k > n) return ffi::Error::InvalidArgument("top_k needs 1 <= k <= the last axis");
  const int64_t rows = static_cast<int64_t>(x.element_count()) / n;
  if (rows == 0) return ffi::Error::Success();
  const float* data = x.typed_data();
  float* out_vals = vals->typed_data();
  int32_t* out_idx = idx->typed_data();
  const int64_t per_block = std::max<int64_t>(1, std::min<int64_t>(64, (1 << 18) / n));
  saewb::ParallelFor(pool, (rows + per_block - 1) / per_block, [&](int64_t b) {
    thread_local std::vector<Cand> buf;
    buf.reserve(std::max(HeadSize(n, k), Capacity(k)) + 1);
    for (int64_t r = b * per_block, end = std::min(rows, (b + 1) * per_block); r < end; ++r)
      RowTopK(data + r * n, score, n, k, out_vals + r * k, out_idx + r * k, buf);
  });
  return ffi::Error::Success();
}

ffi::Error TopKImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> vals,
                    ffi::ResultBuffer<ffi::S32> idx, int64_t k) {
  return Run(pool, x, Plain{}, vals, idx, k);
}

ffi::Error ReluTopKImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> z, ffi::Buffer<ffi::F32> bias,
                        ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> vals,
                        ffi::ResultBuffer<ffi::S32> idx, int64_t k) {
  const auto dims = z.dimensions();
  const int64_t n = dims.size() == 0 ? 0 : dims.back();
  if (static_cast<int64_t>(bias.element_count()) != n || static_cast<int64_t>(scale.element_count()) != n)
    return ffi::Error::InvalidArgument("relu_top_k needs bias and scale as long as the last axis");
  return Run(pool, z, ReluAffine{bias.typed_data(), scale.typed_data()}, vals, idx, k);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SaewbTopKF32, TopKImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("k"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SaewbReluTopKF32, ReluTopKImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("k"));
