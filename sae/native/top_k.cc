// Top-k over the last axis of a float32 array, as XLA FFI custom calls for the CPU: of the array
// itself, or of ReLU(z + bias) * scale (a TopK SAE's scores) without writing those scores out; and
// AuxK's top-k among the dead latents, alone or in the same pass.
//
// Same result as jax.lax.top_k, index for index: values in descending order under XLA's total
// order (the float bits read as a sign-magnitude integer, so -0.0 < +0.0 and NaN above +inf),
// ties broken by the lower index. XLA's own CPU top-k sorts every row partially, one row at a
// time on one thread; here each row is one pass that keeps a buffer of the best candidates and
// skips, with one vector compare, every 16-wide block with nothing above its floor, and blocks of
// rows share XLA's threads.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <limits>
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

// One row's search over elements offered in index order: a buffer of the best candidates so far and
// the floor a later element must beat. The first `head` elements all enter; the k-th best of them is
// the first floor (with head = 8k a high one: about k ln(n / head) later elements of a random order
// pass it).
class Selector {
 public:
  Selector(std::vector<Cand>& buf, int64_t k, int64_t head)
      : buf_(buf), k_(k), cap_(Capacity(k)), head_(head) {
    buf_.clear();
  }

  // Offers the keys of len <= kTile elements, element t being index_of(t), after every earlier one.
  template <typename IndexOf>
  void Offer(const int32_t* keys, int64_t len, IndexOf index_of) {
    alignas(64) uint8_t hit[kTile];
    // One vectorised compare against the floor at the tile's start (the floor only rises), then
    // only 16-wide blocks with a hit are looked at one by one.
    const int32_t entry = floor_;
#pragma omp simd
    for (int64_t t = 0; t < len; ++t) hit[t] = keys[t] > entry;
    std::fill(hit + len, hit + kTile, 0);
    for (int64_t b = 0; b < len; b += kBlock) {
      uint64_t lo, hi;
      std::memcpy(&lo, hit + b, 8);
      std::memcpy(&hi, hit + b + 8, 8);
      if (filling_) {
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
        if (!filling_ && keys[t] <= floor_) continue;
        buf_.push_back(Pack(keys[t], index_of(t)));
        if (filling_) {
          if (static_cast<int64_t>(buf_.size()) == head_) {
            filling_ = false;
            floor_ = Shrink(buf_, k_);
          }
        } else if (static_cast<int64_t>(buf_.size()) >= cap_) {
          floor_ = Shrink(buf_, k_);
        }
      }
    }
  }

  // Writes the indices of the best min(k, offered) elements, best first, and returns their count.
  int64_t Finish(int32_t* idx) {
    if (static_cast<int64_t>(buf_.size()) > k_) Shrink(buf_, k_);
    std::sort(buf_.begin(), buf_.end(), std::greater<Cand>());
    for (size_t t = 0; t < buf_.size(); ++t) idx[t] = IndexOf(buf_[t]);
    return static_cast<int64_t>(buf_.size());
  }

 private:
  std::vector<Cand>& buf_;
  const int64_t k_, cap_, head_;
  int32_t floor_ = INT32_MIN;
  bool filling_ = true;
};

template <typename Score>
void RowTopK(const float* x, const Score& score, int64_t n, int64_t k, float* vals, int32_t* idx,
             std::vector<Cand>& buf) {
  alignas(64) float tile[kTile];
  alignas(64) int32_t keys[kTile];
  Selector top(buf, k, HeadSize(n, k));
  for (int64_t start = 0; start < n; start += kTile) {
    const int64_t len = std::min(kTile, n - start);
    score.Fill(x, start, len, tile);
#pragma omp simd
    for (int64_t t = 0; t < len; ++t) keys[t] = OrderKey(tile[t]);
    top.Offer(keys, len, [start](int64_t t) { return start + t; });
  }
  top.Finish(idx);
  for (int64_t t = 0; t < k; ++t) score.Fill(x, idx[t], 1, vals + t);
}

// The dead latents of one SAE, listed once for all its rows.
struct DeadList {
  std::vector<int32_t> ids;        // the dead latents, ascending
  std::vector<int64_t> tile_from;  // ids[tile_from[i]] is the first dead latent in tile i or later
  std::vector<int32_t> live;       // the first k_aux live latents, ascending (the masked search's
                                   // picks past the dead ones, at -inf)

  DeadList(const bool* dead, int64_t n, int64_t k_aux) {
    for (int64_t j = 0; j < n; ++j) {
      if (j % kTile == 0) tile_from.push_back(static_cast<int64_t>(ids.size()));
      if (dead[j]) {
        ids.push_back(static_cast<int32_t>(j));
      } else if (static_cast<int64_t>(live.size()) < k_aux) {
        live.push_back(static_cast<int32_t>(j));
      }
    }
    tile_from.push_back(static_cast<int64_t>(ids.size()));
  }
};

// RowTopK (skipped when k = 0), and from the same scores jax.lax.top_k(where(dead, scores, -inf),
// k_aux): AuxK's picks.
// Only the dead latents' keys go to that second search, and it starts its floor after k_aux of them
// (not 8 k_aux): most dead latents score a ReLU'd zero, so once the floor is zero only the few
// positive ones are looked at again.
template <typename Score>
void RowTopKAndDead(const float* x, const Score& score, const DeadList& dead, int64_t n, int64_t k,
                    int64_t k_aux, float* vals, int32_t* idx, float* aux_vals, int32_t* aux_idx,
                    std::vector<Cand>& buf, std::vector<Cand>& aux_buf) {
  alignas(64) float tile[kTile];
  alignas(64) int32_t keys[kTile];
  alignas(64) int32_t dead_keys[kTile];
  const int64_t k_top = std::max<int64_t>(k, 1);
  Selector top(buf, k_top, HeadSize(n, k_top)), aux(aux_buf, k_aux, k_aux);
  for (int64_t start = 0, i = 0; start < n; start += kTile, ++i) {
    const int64_t len = std::min(kTile, n - start);
    score.Fill(x, start, len, tile);
#pragma omp simd
    for (int64_t t = 0; t < len; ++t) keys[t] = OrderKey(tile[t]);
    if (k > 0) top.Offer(keys, len, [start](int64_t t) { return start + t; });
    const int32_t* ids = dead.ids.data() + dead.tile_from[i];
    const int64_t n_dead = dead.tile_from[i + 1] - dead.tile_from[i];
    for (int64_t t = 0; t < n_dead; ++t) dead_keys[t] = keys[ids[t] - start];
    aux.Offer(dead_keys, n_dead, [ids](int64_t t) { return ids[t]; });
  }
  if (k > 0) top.Finish(idx);
  for (int64_t t = 0; t < k; ++t) score.Fill(x, idx[t], 1, vals + t);
  const int64_t found = aux.Finish(aux_idx);
  for (int64_t t = 0; t < found; ++t) score.Fill(x, aux_idx[t], 1, aux_vals + t);
  for (int64_t t = found; t < k_aux; ++t) {  // fewer dead latents than k_aux: the live ones at -inf
    aux_idx[t] = dead.live[t - found];
    aux_vals[t] = -std::numeric_limits<float>::infinity();
  }
}

// Calls row(r, buf, aux_buf) for each of `rows` rows of length n, blocks of rows shared across XLA's
// threads, each thread with its own candidate buffers.
template <typename RowFn>
void ForRows(ffi::ThreadPool& pool, int64_t rows, int64_t n, int64_t max_k, RowFn row) {
  const int64_t per_block = std::max<int64_t>(1, std::min<int64_t>(64, (1 << 18) / n));
  saewb::ParallelFor(pool, (rows + per_block - 1) / per_block, [&](int64_t b) {
    thread_local std::vector<Cand> buf, aux_buf;
    buf.reserve(std::max(HeadSize(n, max_k), Capacity(max_k)) + 1);
    for (int64_t r = b * per_block, end = std::min(rows, (b + 1) * per_block); r < end; ++r)
      row(r, buf, aux_buf);
  });
}

// Sets n to the last axis's length, checked: at least one axis and 1 <= k <= n.
ffi::Error LastAxis(const ffi::Buffer<ffi::F32>& x, int64_t k, int64_t& n) {
  const auto dims = x.dimensions();
  if (dims.size() == 0) return ffi::Error::InvalidArgument("top_k needs at least one axis");
  n = dims.back();
  if (k < 1 || k > n) return ffi::Error::InvalidArgument("top_k needs 1 <= k <= the last axis");
  return ffi::Error::Success();
}

ffi::Error CheckPerLatent(int64_t n, std::initializer_list<size_t> counts) {
  for (size_t c : counts)
    if (static_cast<int64_t>(c) != n)
      return ffi::Error::InvalidArgument("relu_top_k needs bias and scale as long as the last axis");
  return ffi::Error::Success();
}

template <typename Score>
ffi::Error Run(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& x, const Score& score,
               ffi::ResultBuffer<ffi::F32>& vals, ffi::ResultBuffer<ffi::S32>& idx, int64_t k) {
  int64_t n;
  if (auto e = LastAxis(x, k, n); e.failure()) return e;
  const int64_t rows = static_cast<int64_t>(x.element_count()) / n;
  const float* data = x.typed_data();
  float* out_vals = vals->typed_data();
  int32_t* out_idx = idx->typed_data();
  ForRows(pool, rows, n, k, [&](int64_t r, std::vector<Cand>& buf, std::vector<Cand>&) {
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
  if (auto e = CheckPerLatent(n, {bias.element_count(), scale.element_count()}); e.failure()) return e;
  return Run(pool, z, ReluAffine{bias.typed_data(), scale.typed_data()}, vals, idx, k);
}

// Both dead-latent entry points: rows of `x` scored by `score`, their top k (skipped when k = 0) and
// AuxK's top k_aux among the dead latents.
template <typename Score>
ffi::Error RunDead(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& x, const Score& score,
                   ffi::Buffer<ffi::PRED>& dead, float* vals, int32_t* idx, float* aux_vals, int32_t* aux_idx,
                   int64_t k, int64_t k_aux) {
  int64_t n;
  if (auto e = LastAxis(x, std::max(k, k_aux), n); e.failure()) return e;
  if (k < 0 || k_aux < 1) return ffi::Error::InvalidArgument("top_k needs 1 <= k <= the last axis");
  if (static_cast<int64_t>(dead.element_count()) != n)
    return ffi::Error::InvalidArgument("the dead mask must be as long as the last axis");
  const int64_t rows = static_cast<int64_t>(x.element_count()) / n;
  const float* data = x.typed_data();
  const DeadList dead_list(dead.typed_data(), n, k_aux);
  ForRows(pool, rows, n, std::max(k, k_aux), [&](int64_t r, std::vector<Cand>& buf,
                                                  std::vector<Cand>& aux_buf) {
    RowTopKAndDead(data + r * n, score, dead_list, n, k, k_aux, vals + r * k, idx + r * k,
                   aux_vals + r * k_aux, aux_idx + r * k_aux, buf, aux_buf);
  });
  return ffi::Error::Success();
}

ffi::Error DeadTopKImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::PRED> dead,
                        ffi::ResultBuffer<ffi::F32> vals, ffi::ResultBuffer<ffi::S32> idx, int64_t k) {
  return RunDead(pool, x, Plain{}, dead, nullptr, nullptr, vals->typed_data(), idx->typed_data(), 0, k);
}

ffi::Error ReluTopKAndDeadImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> z, ffi::Buffer<ffi::F32> bias,
                               ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::PRED> dead,
                               ffi::ResultBuffer<ffi::F32> vals, ffi::ResultBuffer<ffi::S32> idx,
                               ffi::ResultBuffer<ffi::F32> aux_vals, ffi::ResultBuffer<ffi::S32> aux_idx,
                               int64_t k, int64_t k_aux) {
  if (k < 1) return ffi::Error::InvalidArgument("top_k needs 1 <= k <= the last axis");
  const auto dims = z.dimensions();
  const int64_t n = dims.size() == 0 ? 0 : dims.back();
  if (auto e = CheckPerLatent(n, {bias.element_count(), scale.element_count()}); e.failure()) return e;
  return RunDead(pool, z, ReluAffine{bias.typed_data(), scale.typed_data()}, dead, vals->typed_data(),
                 idx->typed_data(), aux_vals->typed_data(), aux_idx->typed_data(), k, k_aux);
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(SaewbReluTopKAndDeadF32, ReluTopKAndDeadImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("k")
                                  .Attr<int64_t>("k_aux"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SaewbDeadTopKF32, DeadTopKImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("k"));
