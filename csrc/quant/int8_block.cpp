#include "quant/int8_block.hpp"

#include <cmath>
#include <limits>
#include <vector>

namespace llmio {

namespace {

// Quantizes one block of v (already residual-added); writes q and returns the scale.
inline float quantize_one(const float* v, size_t len, int8_t* q, float* residual) {
  float absmax = 0.0f;
  bool finite = true;
  for (size_t i = 0; i < len; ++i) {
    const float a = std::fabs(v[i]);
    if (!std::isfinite(v[i])) finite = false;
    absmax = a > absmax ? a : absmax;
  }
  if (!finite) {
    for (size_t i = 0; i < len; ++i) {
      q[i] = 0;
      if (residual) residual[i] = 0.0f;
    }
    return std::numeric_limits<float>::quiet_NaN();
  }
  const float scale = absmax / 127.0f;
  if (scale == 0.0f) {
    for (size_t i = 0; i < len; ++i) {
      q[i] = 0;
      if (residual) residual[i] = v[i];
    }
    return 0.0f;
  }
  for (size_t i = 0; i < len; ++i) {
    float r = std::nearbyint(v[i] / scale);  // round half to even (default FE_TONEAREST)
    r = r > 127.0f ? 127.0f : (r < -127.0f ? -127.0f : r);
    q[i] = static_cast<int8_t>(r);
    if (residual) residual[i] = v[i] - static_cast<float>(q[i]) * scale;
  }
  return scale;
}

// Quantizes v with a given scale (finite, > 0); the rounding step of quantize_one.
inline void quantize_with_scale(const float* v, size_t len, float scale, int8_t* q, float* residual) {
  for (size_t i = 0; i < len; ++i) {
    float r = std::nearbyint(v[i] / scale);  // round half to even (default FE_TONEAREST)
    r = r > 127.0f ? 127.0f : (r < -127.0f ? -127.0f : r);
    q[i] = static_cast<int8_t>(r);
    if (residual) residual[i] = v[i] - static_cast<float>(q[i]) * scale;
  }
}

}  // namespace

void quantize_blocks_ref(const float* x, float* residual, size_t n, int8_t* codes, float* scales) {
  float v[kQuantBlock];
  for (size_t b = 0, i0 = 0; i0 < n; ++b, i0 += kQuantBlock) {
    const size_t len = n - i0 < kQuantBlock ? n - i0 : kQuantBlock;
    for (size_t i = 0; i < len; ++i) v[i] = x[i0 + i] + (residual ? residual[i0 + i] : 0.0f);
    scales[b] = quantize_one(v, len, codes + i0, residual ? residual + i0 : nullptr);
  }
}

void dequantize_blocks_ref(const int8_t* codes, const float* scales, size_t n, float* out) {
  for (size_t i = 0; i < n; ++i) out[i] = static_cast<float>(codes[i]) * scales[i / kQuantBlock];
}

void dequant_sum_requant_ref(const int8_t* const* codes_w, const float* const* scales_w, size_t world,
                             size_t n, float* residual, int8_t* codes, float* scales) {
  float v[kQuantBlock];
  const float wf = static_cast<float>(world);
  for (size_t b = 0, i0 = 0; i0 < n; ++b, i0 += kQuantBlock) {
    const size_t len = n - i0 < kQuantBlock ? n - i0 : kQuantBlock;
    for (size_t i = 0; i < len; ++i) {
      // Each copy is divided by W before it is added: the sum of W values near the fp32
      // maximum would overflow to inf before the division.
      float s = 0.0f;
      for (size_t r = 0; r < world; ++r) s += (static_cast<float>(codes_w[r][i0 + i]) * scales_w[r][b]) / wf;
      v[i] = s + (residual ? residual[i0 + i] : 0.0f);
    }
    scales[b] = quantize_one(v, len, codes + i0, residual ? residual + i0 : nullptr);
  }
}

void block_absmax_ref(const float* x, const float* residual, size_t n, float* absmax) {
  for (size_t b = 0, i0 = 0; i0 < n; ++b, i0 += kQuantBlock) {
    const size_t len = n - i0 < kQuantBlock ? n - i0 : kQuantBlock;
    float m = 0.0f;
    bool finite = true;
    for (size_t i = 0; i < len; ++i) {
      const float v = x[i0 + i] + (residual ? residual[i0 + i] : 0.0f);
      const float a = std::fabs(v);
      if (!std::isfinite(v)) finite = false;
      m = a > m ? a : m;
    }
    absmax[b] = finite ? m : std::numeric_limits<float>::infinity();
  }
}

void quantize_blocks_shared_ref(const float* x, float* residual, size_t n, const float* absmax, int8_t* codes,
                                float* scales) {
  float v[kQuantBlock];
  for (size_t b = 0, i0 = 0; i0 < n; ++b, i0 += kQuantBlock) {
    const size_t len = n - i0 < kQuantBlock ? n - i0 : kQuantBlock;
    for (size_t i = 0; i < len; ++i) v[i] = x[i0 + i] + (residual ? residual[i0 + i] : 0.0f);
    float* res = residual ? residual + i0 : nullptr;
    int8_t* q = codes + i0;
    if (!std::isfinite(absmax[b])) {
      for (size_t i = 0; i < len; ++i) {
        q[i] = 0;
        if (res) res[i] = 0.0f;
      }
      scales[b] = std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    const float scale = absmax[b] / 127.0f;
    scales[b] = scale;
    if (scale == 0.0f) {
      for (size_t i = 0; i < len; ++i) {
        q[i] = 0;
        if (res) res[i] = v[i];
      }
      continue;
    }
    quantize_with_scale(v, len, scale, q, res);
  }
}

void dequant_sum_requant_shared_ref(const int8_t* const* codes_w, size_t world, size_t n, const float* scales,
                                    float* residual, int8_t* codes, float* out_scales) {
  float v[kQuantBlock];
  const float wf = static_cast<float>(world);
  for (size_t b = 0, i0 = 0; i0 < n; ++b, i0 += kQuantBlock) {
    const size_t len = n - i0 < kQuantBlock ? n - i0 : kQuantBlock;
    for (size_t i = 0; i < len; ++i) {
      int32_t s = 0;
      for (size_t r = 0; r < world; ++r) s += codes_w[r][i0 + i];
      // |S / W| <= 127: scaling the mean code (not the sum) cannot overflow.
      v[i] = (static_cast<float>(s) / wf) * scales[b] + (residual ? residual[i0 + i] : 0.0f);
    }
    out_scales[b] = quantize_one(v, len, codes + i0, residual ? residual + i0 : nullptr);
  }
}

}  // namespace llmio
