// The sparse kernels of a TopK step (sae/sparse_ops.py) as XLA FFI custom calls for the CPU.
// Every token uses k rows of an [n, d] matrix:
//
//   WeightedRowSum  out[b]    = sum_j vals[b, j] * m[idx[b, j]]              (decode)
//   RowDots         out[b, j] = g[b] . m[idx[b, j]]                          (its input gradient)
//   ScatterOuter    out[i]    = sum over idx[b, j] == i of coef[b, j] * rows[b]   (weight gradients)
//                   sums[i]   = sum over idx[b, j] == i of coef[b, j]             (bias gradient)
//
// XLA runs the gathers as a loop over j on one thread and the scatter as one serial scatter of a
// [B * k, d] block it first writes out. Here tokens (gathers) or latents (scatter) are shared
// between XLA's threads, and the scatter reads each token's row where it lies: the (b, j) pairs are
// counting-sorted by latent, so each latent's row is summed by one thread, in increasing (b, j)
// order, and the result does not depend on the number of threads. ScatterOuter writes [n, d], or
// [d, n] (the encoder's layout) when `transposed` is set, so no separate transpose pass is needed.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kTokensPerBlock = 16;
constexpr int64_t kLatentsPerBlock = 16;

// Checks idx: [B, k], every index in [0, n).
ffi::Error CheckIndices(ffi::Buffer<ffi::S32>& idx, int64_t n, int64_t& b, int64_t& k) {
  const auto dims = idx.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("sparse kernels need idx of shape [B, k]");
  b = dims[0];
  k = dims[1];
  const int32_t* ix = idx.typed_data();
  for (int64_t t = 0, total = b * k; t < total; ++t)
    if (static_cast<uint32_t>(ix[t]) >= static_cast<uint32_t>(n))
      return ffi::Error::InvalidArgument("sparse kernels need every index in [0, n)");
  return ffi::Error::Success();
}

// The two gathers: per_token(b, k, d, row) for each token b, where row(j) points at m[idx[b, j]] of
// m [n, d]; the tokens are shared between threads. `arg` is the gather's other input: [B, k] values when `arg_per_pick`,
// else a [B, d] row per token.
template <typename PerToken>
ffi::Error GatherRows(ffi::ThreadPool& pool, const char* shape_error, ffi::Buffer<ffi::F32>& arg,
                      bool arg_per_pick, ffi::Buffer<ffi::S32>& idx, ffi::Buffer<ffi::F32>& m,
                      PerToken per_token) {
  const auto dims = m.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument(shape_error);
  const int64_t n = dims[0], d = dims[1];
  int64_t b, k;
  if (auto err = CheckIndices(idx, n, b, k); err.failure()) return err;
  if (static_cast<int64_t>(arg.element_count()) != b * (arg_per_pick ? k : d))
    return ffi::Error::InvalidArgument(shape_error);
  const int32_t* ix = idx.typed_data();
  const float* mat = m.typed_data();
  saewb::ParallelFor(pool, (b + kTokensPerBlock - 1) / kTokensPerBlock, [&](int64_t blk) {
    for (int64_t t = blk * kTokensPerBlock, end = std::min(b, t + kTokensPerBlock); t < end; ++t)
      per_token(t, k, d, [&](int64_t j) { return mat + static_cast<int64_t>(ix[t * k + j]) * d; });
  });
  return ffi::Error::Success();
}

ffi::Error WeightedRowSumImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> vals, ffi::Buffer<ffi::S32> idx,
                              ffi::Buffer<ffi::F32> m, ffi::ResultBuffer<ffi::F32> out) {
  const float* v = vals.typed_data();
  float* o = out->typed_data();
  return GatherRows(pool, "weighted_row_sum needs vals and idx [B, k] and m [n, d]", vals, true, idx, m,
                    [&](int64_t b, int64_t k, int64_t d, auto row) {
                      float* __restrict acc = o + b * d;
                      std::fill(acc, acc + d, 0.0f);
                      for (int64_t j = 0; j < k; ++j) {
                        const float c = v[b * k + j];
                        const float* __restrict r = row(j);
#pragma omp simd
                        for (int64_t t = 0; t < d; ++t) acc[t] += c * r[t];
                      }
                    });
}

ffi::Error RowDotsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::S32> idx,
                       ffi::Buffer<ffi::F32> m, ffi::ResultBuffer<ffi::F32> out) {
  const float* gv = g.typed_data();
  float* o = out->typed_data();
  return GatherRows(pool, "row_dots needs g [B, d], idx [B, k] and m [n, d]", g, false, idx, m,
                    [&](int64_t b, int64_t k, int64_t d, auto row) {
                      const float* __restrict gb = gv + b * d;
                      for (int64_t j = 0; j < k; ++j) {
                        const float* __restrict r = row(j);
                        float s = 0.0f;
#pragma omp simd reduction(+ : s)
                        for (int64_t t = 0; t < d; ++t) s += gb[t] * r[t];
                        o[b * k + j] = s;
                      }
                    });
}

ffi::Error ScatterOuterImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> coef, ffi::Buffer<ffi::S32> idx,
                            ffi::Buffer<ffi::F32> rows, ffi::ResultBuffer<ffi::F32> out,
                            ffi::ResultBuffer<ffi::F32> sums, bool transposed) {
  const auto out_dims = out->dimensions();
  const auto row_dims = rows.dimensions();
  if (out_dims.size() != 2 || row_dims.size() != 2)
    return ffi::Error::InvalidArgument("scatter_outer needs rows [B, d] and an output [n, d] or [d, n]");
  const int64_t n = transposed ? out_dims[1] : out_dims[0];
  const int64_t d = transposed ? out_dims[0] : out_dims[1];
  int64_t b, k;
  if (auto err = CheckIndices(idx, n, b, k); err.failure()) return err;
  if (row_dims[0] != b || row_dims[1] != d || static_cast<int64_t>(coef.element_count()) != b * k)
    return ffi::Error::InvalidArgument("scatter_outer needs coef [B, k], idx [B, k] and rows [B, d]");
  const float* cf = coef.typed_data();
  const int32_t* ix = idx.typed_data();
  const float* r = rows.typed_data();
  float* o = out->typed_data();
  float* sm = sums->typed_data();

  // Counting sort of the pairs by latent; within a latent they stay in increasing (b, j) order.
  const int64_t pairs = b * k;
  std::vector<int64_t> start(n + 1, 0);
  for (int64_t t = 0; t < pairs; ++t) ++start[ix[t] + 1];
  for (int64_t i = 0; i < n; ++i) start[i + 1] += start[i];
  std::vector<int64_t> order(pairs);
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t t = 0; t < pairs; ++t) order[fill[ix[t]]++] = t;
  }

  saewb::ParallelFor(pool, (n + kLatentsPerBlock - 1) / kLatentsPerBlock, [&](int64_t blk) {
    const int64_t i0 = blk * kLatentsPerBlock, i1 = std::min(n, i0 + kLatentsPerBlock);
    thread_local std::vector<float> block;  // the block's rows, for the transposed write
    if (transposed) block.assign(kLatentsPerBlock * d, 0.0f);
    for (int64_t i = i0; i < i1; ++i) {
      float* __restrict acc = transposed ? block.data() + (i - i0) * d : o + i * d;
      if (!transposed) std::fill(acc, acc + d, 0.0f);
      float total = 0.0f;
      for (int64_t q = start[i]; q < start[i + 1]; ++q) {
        const int64_t t = order[q];
        const float c = cf[t];
        const float* __restrict row = r + (t / k) * d;
        total += c;
#pragma omp simd
        for (int64_t u = 0; u < d; ++u) acc[u] += c * row[u];
      }
      sm[i] = total;
    }
    if (transposed)
      for (int64_t u = 0; u < d; ++u)
        for (int64_t i = i0; i < i1; ++i) o[u * n + i] = block[(i - i0) * d + u];
  });
  return ffi::Error::Success();
}

}  // namespace

// The two gathers take (values or g, idx, m) and return one float array.
static auto GatherBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::S32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(SaewbWeightedRowSumF32, WeightedRowSumImpl, GatherBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(SaewbRowDotsF32, RowDotsImpl, GatherBinding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SaewbScatterOuterF32, ScatterOuterImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("transposed"));
