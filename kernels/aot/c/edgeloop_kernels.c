/* edgeloop int8 kernels: see edgeloop_kernels.h. Each function names the TFLM (or gemmlowp
 * fixedpoint.h) function it ports; the arithmetic follows it operation for operation. */
#include "edgeloop_kernels.h"

#include <string.h>

/* ---- gemmlowp fixed point (fixedpoint/fixedpoint.h), int32 and int16 ------------------- */
static int32_t wrap_add(int32_t a, int32_t b) { return (int32_t)((uint32_t)a + (uint32_t)b); }
static int32_t wrap_sub(int32_t a, int32_t b) { return (int32_t)((uint32_t)a - (uint32_t)b); }
static int32_t wrap_neg(int32_t a) { return (int32_t)(0u - (uint32_t)a); }
static int32_t clamp32(int32_t x, int32_t lo, int32_t hi) { return x < lo ? lo : (x > hi ? hi : x); }

/* SaturatingRoundingDoublingHighMul<int32_t> */
static int32_t srdhm(int32_t a, int32_t b) {
  const int overflow = a == b && a == INT32_MIN;
  const int64_t ab = (int64_t)a * (int64_t)b;
  const int32_t nudge = ab >= 0 ? (1 << 30) : (1 - (1 << 30));
  const int32_t high = (int32_t)((ab + nudge) / ((int64_t)1 << 31));
  return overflow ? INT32_MAX : high;
}

/* RoundingDivideByPOT<int32_t> */
static int32_t rdbpot(int32_t x, int exponent) {
  const int32_t mask = (int32_t)(((int64_t)1 << exponent) - 1);
  const int32_t remainder = x & mask;
  const int32_t threshold = (mask >> 1) + (x < 0 ? 1 : 0);
  return (x >> exponent) + (remainder > threshold ? 1 : 0);
}

/* SaturatingRoundingMultiplyByPOT<exponent> for exponent > 0 (saturating left shift) */
static int32_t sat_shift_left(int32_t x, int exponent) {
  const int32_t threshold = (int32_t)((1u << (31 - exponent)) - 1u);
  if (x > threshold) return INT32_MAX;
  if (x < -threshold) return INT32_MIN;
  return (int32_t)((uint32_t)x << exponent);
}

/* RoundingHalfSum<int32_t> */
static int32_t rounding_half_sum(int32_t a, int32_t b) {
  const int64_t sum = (int64_t)a + (int64_t)b;
  const int64_t sign = sum >= 0 ? 1 : -1;
  return (int32_t)((sum + sign) / 2);
}

/* exp_on_interval_between_negative_one_quarter_and_0_excl, Q0.31 in and out */
static int32_t exp_on_interval(int32_t a) {
  const int32_t constant_term = 1895147668;    /* exp(-1/8) */
  const int32_t constant_1_over_3 = 715827883;
  const int32_t x = wrap_add(a, 1 << 28);
  const int32_t x2 = srdhm(x, x);
  const int32_t x3 = srdhm(x2, x);
  const int32_t x4 = srdhm(x2, x2);
  const int32_t x4_over_4 = rdbpot(x4, 2);
  const int32_t poly = rdbpot(wrap_add(srdhm(wrap_add(x4_over_4, x3), constant_1_over_3), x2), 1);
  return wrap_add(constant_term, srdhm(constant_term, wrap_add(x, poly)));
}

/* exp_on_negative_values for an input with integer_bits integer bits (at most 5 here) */
static int32_t exp_on_negative_values(int32_t a, int integer_bits) {
  static const int32_t multipliers[7] = {1672461947, 1302514674, 790015084, 290630308,
                                         39332535, 720401, 242};
  const int fractional_bits = 31 - integer_bits;
  const int32_t one_quarter = (int32_t)1 << (fractional_bits - 2);
  const int32_t mask = one_quarter - 1;
  const int32_t a_mod_quarter_minus_one_quarter = wrap_sub(a & mask, one_quarter);
  int32_t result = exp_on_interval(sat_shift_left(a_mod_quarter_minus_one_quarter, integer_bits));
  const int32_t remainder = wrap_sub(a_mod_quarter_minus_one_quarter, a);
  int exponent;
  for (exponent = -2; exponent <= 4; ++exponent) {
    if (integer_bits > exponent) {
      const int shift = fractional_bits + exponent;
      if (remainder & ((int32_t)1 << shift)) result = srdhm(result, multipliers[exponent + 2]);
    }
  }
  /* (gemmlowp clamps below -32 only for more than 5 integer bits) */
  return a == 0 ? INT32_MAX : result;
}

/* Newton-Raphson loop shared by one_over_one_plus_x_for_x_in_0_1 and
 * one_minus_x_over_one_plus_x_for_x_in_0_1: returns x in Q2.29 */
static int32_t newton_reciprocal_q2(int32_t half_denominator) {
  const int32_t constant_48_over_17 = 1515870810;
  const int32_t constant_neg_32_over_17 = -1010580540;
  const int32_t one_q2 = 1 << 29;
  int32_t x = wrap_add(constant_48_over_17, srdhm(half_denominator, constant_neg_32_over_17));
  int i;
  for (i = 0; i < 3; i++) {
    const int32_t half_denominator_times_x = srdhm(half_denominator, x);
    const int32_t one_minus = wrap_sub(one_q2, half_denominator_times_x);
    x = wrap_add(x, sat_shift_left(srdhm(x, one_minus), 2));
  }
  return x;
}

static int32_t one_over_one_plus_x_for_x_in_0_1(int32_t a) {
  return sat_shift_left(newton_reciprocal_q2(rounding_half_sum(a, INT32_MAX)), 1);
}

static int32_t one_minus_x_over_one_plus_x_for_x_in_0_1(int32_t a) {
  return sat_shift_left(wrap_sub(newton_reciprocal_q2(rounding_half_sum(a, INT32_MAX)), 1 << 29), 2);
}

/* gemmlowp::logistic for a Q4.27 input, Q0.31 output */
static int32_t fixed_logistic_q4(int32_t a) {
  const int32_t abs_input = a > 0 ? a : wrap_neg(a);
  const int32_t if_positive = one_over_one_plus_x_for_x_in_0_1(exp_on_negative_values(wrap_neg(abs_input), 4));
  const int32_t if_negative = wrap_sub(INT32_MAX, if_positive);
  if (a == 0) return 1 << 30;
  return a > 0 ? if_positive : if_negative;
}

/* gemmlowp::tanh for a Q4.27 input, Q0.31 output */
static int32_t fixed_tanh_q4(int32_t a) {
  const int32_t n = a < 0 ? a : wrap_neg(a);
  const int32_t t = one_minus_x_over_one_plus_x_for_x_in_0_1(exp_on_negative_values(n, 5));
  if (a == 0) return 0;
  return a < 0 ? wrap_neg(t) : t;
}

static int16_t srdhm16(int16_t a, int16_t b) {
  const int overflow = a == b && a == INT16_MIN;
  const int32_t ab = (int32_t)a * (int32_t)b;
  const int32_t nudge = ab >= 0 ? (1 << 14) : (1 - (1 << 14));
  const int16_t high = (int16_t)((ab + nudge) / (1 << 15));
  return overflow ? INT16_MAX : high;
}

static int16_t rdbpot16(int16_t x, int exponent) {
  const int16_t mask = (int16_t)((1 << exponent) - 1);
  const int16_t remainder = (int16_t)(x & mask);
  const int16_t threshold = (int16_t)((mask >> 1) + (x < 0 ? 1 : 0));
  return (int16_t)((x >> exponent) + (remainder > threshold ? 1 : 0));
}

/* ---- tflite/kernels/internal/common.h -------------------------------------------------- */
/* MultiplyByQuantizedMultiplier(int32_t x, ...), double rounding (TFLM's default build) */
int32_t el_multiply_by_quantized_multiplier(int32_t x, int32_t multiplier, int shift) {
  const int left_shift = shift > 0 ? shift : 0;
  const int right_shift = shift > 0 ? 0 : -shift;
  return rdbpot(srdhm((int32_t)((uint32_t)x << left_shift), multiplier), right_shift);
}
#define MBQM el_multiply_by_quantized_multiplier

/* ---- reference_integer_ops::FullyConnected / FullyConnectedPerChannel ------------------- */
void el_fully_connected(const el_fc_params *p, const int8_t *input, const int8_t *filter,
                        const int32_t *bias, int8_t *output) {
  int32_t b, c, d;
  for (b = 0; b < p->batches; ++b) {
    for (c = 0; c < p->output_depth; ++c) {
      int32_t acc = 0;
      const int8_t *x = input + b * p->accum_depth;
      const int8_t *w = filter + c * p->accum_depth;
      for (d = 0; d < p->accum_depth; ++d) {
        acc += ((int32_t)w[d] + p->filter_offset) * ((int32_t)x[d] + p->input_offset);
      }
      if (bias) acc += bias[c];
      acc = MBQM(acc, p->multiplier[c], p->shift[c]) + p->output_offset;
      output[c + p->output_depth * b] = (int8_t)clamp32(acc, p->act_min, p->act_max);
    }
  }
}

/* ---- reference_integer_ops::ConvPerChannel ----------------------------------------------- */
/* One output value of reference_integer_ops::ConvPerChannel. */
static int8_t conv_point(const el_conv_params *p, const int8_t *input, const int8_t *filter,
                         const int32_t *bias, int32_t batch, int32_t out_y, int32_t out_x, int32_t oc) {
  const int32_t groups = p->in_c / p->filter_in_c;
  const int32_t filters_per_group = p->out_c / groups;
  const int32_t group = oc / filters_per_group;
  const int32_t in_y_origin = out_y * p->stride_h - p->pad_h;
  const int32_t in_x_origin = out_x * p->stride_w - p->pad_w;
  int32_t acc = 0, fy, fx, ic;
  for (fy = 0; fy < p->filter_h; ++fy) {
    const int32_t in_y = in_y_origin + p->dilation_h * fy;
    for (fx = 0; fx < p->filter_w; ++fx) {
      const int32_t in_x = in_x_origin + p->dilation_w * fx;
      const int8_t *x, *w;
      if (in_x < 0 || in_x >= p->in_w || in_y < 0 || in_y >= p->in_h) continue;
      x = input + ((batch * p->in_h + in_y) * p->in_w + in_x) * p->in_c + group * p->filter_in_c;
      w = filter + ((oc * p->filter_h + fy) * p->filter_w + fx) * p->filter_in_c;
      for (ic = 0; ic < p->filter_in_c; ++ic) acc += (int32_t)w[ic] * ((int32_t)x[ic] + p->input_offset);
    }
  }
  if (bias) acc += bias[oc];
  acc = MBQM(acc, p->multiplier[oc], p->shift[oc]) + p->output_offset;
  return (int8_t)clamp32(acc, p->act_min, p->act_max);
}

void el_conv2d(const el_conv_params *p, const int8_t *input, const int8_t *filter,
               const int32_t *bias, int8_t *output) {
  int32_t batch, out_y, out_x, oc;
  for (batch = 0; batch < p->batches; ++batch)
    for (out_y = 0; out_y < p->out_h; ++out_y)
      for (out_x = 0; out_x < p->out_w; ++out_x)
        for (oc = 0; oc < p->out_c; ++oc)
          output[((batch * p->out_h + out_y) * p->out_w + out_x) * p->out_c + oc] =
              conv_point(p, input, filter, bias, batch, out_y, out_x, oc);
}

/* ---- CONV_2D 1x1 (pointwise), in place ---------------------------------------------------- */
/* A 1x1, stride 1, unpadded convolution: output pixel p depends on input pixel p alone. Each
 * pixel's outputs go to scratch (out_c bytes) and then over the buffer. Pixels are visited
 * forward when out_c <= in_c (output pixel p ends at or before input pixel p's start + in_c, over
 * pixels already consumed) and backward when out_c > in_c (output pixel p starts at or after
 * input pixel p, over pixels already consumed). The arithmetic is el_conv2d's, term for term. */
void el_pointwise_conv2d_inplace(const el_conv_params *p, int8_t *buffer, const int8_t *filter,
                                 const int32_t *bias, int8_t *scratch) {
  const int32_t pixels = p->in_h * p->in_w;
  int32_t k, oc, ic;
  for (k = 0; k < pixels; ++k) {
    const int32_t px = p->out_c <= p->in_c ? k : pixels - 1 - k;
    const int8_t *x = buffer + px * p->in_c;
    for (oc = 0; oc < p->out_c; ++oc) {
      const int8_t *w = filter + oc * p->in_c;
      int32_t acc = 0;
      for (ic = 0; ic < p->in_c; ++ic) acc += (int32_t)w[ic] * ((int32_t)x[ic] + p->input_offset);
      if (bias) acc += bias[oc];
      acc = MBQM(acc, p->multiplier[oc], p->shift[oc]) + p->output_offset;
      scratch[oc] = (int8_t)clamp32(acc, p->act_min, p->act_max);
    }
    for (oc = 0; oc < p->out_c; ++oc) buffer[px * p->out_c + oc] = scratch[oc];
  }
}

/* ---- reference_integer_ops::DepthwiseConvPerChannel -------------------------------------- */
/* One output value; input is read at (x_step, y_step, channel_stride) so that the in-place
 * variant can read its scratch copy of one channel. */
static int8_t depthwise_point(const el_conv_params *p, const int8_t *input, int32_t row_stride,
                              int32_t pixel_stride, int32_t in_channel, int32_t out_y, int32_t out_x,
                              int32_t oc, const int8_t *filter, const int32_t *bias) {
  const int32_t in_x_origin = out_x * p->stride_w - p->pad_w;
  const int32_t in_y_origin = out_y * p->stride_h - p->pad_h;
  int32_t acc = 0, fy, fx;
  for (fy = 0; fy < p->filter_h; ++fy) {
    for (fx = 0; fx < p->filter_w; ++fx) {
      const int32_t in_x = in_x_origin + p->dilation_w * fx;
      const int32_t in_y = in_y_origin + p->dilation_h * fy;
      if (in_x >= 0 && in_x < p->in_w && in_y >= 0 && in_y < p->in_h) {
        const int32_t v = input[in_y * row_stride + in_x * pixel_stride + in_channel];
        acc += (int32_t)filter[(fy * p->filter_w + fx) * p->out_c + oc] * (v + p->input_offset);
      }
    }
  }
  if (bias) acc += bias[oc];
  acc = MBQM(acc, p->multiplier[oc], p->shift[oc]) + p->output_offset;
  return (int8_t)clamp32(acc, p->act_min, p->act_max);
}

void el_depthwise_conv2d(const el_conv_params *p, const int8_t *input, const int8_t *filter,
                         const int32_t *bias, int8_t *output) {
  int32_t batch, out_y, out_x, ic, m;
  for (batch = 0; batch < p->batches; ++batch) {
    const int8_t *in_b = input + batch * p->in_h * p->in_w * p->in_c;
    int8_t *out_b = output + batch * p->out_h * p->out_w * p->out_c;
    for (out_y = 0; out_y < p->out_h; ++out_y) {
      for (out_x = 0; out_x < p->out_w; ++out_x) {
        for (ic = 0; ic < p->in_c; ++ic) {
          for (m = 0; m < p->depth_multiplier; ++m) {
            const int32_t oc = m + ic * p->depth_multiplier;
            out_b[(out_y * p->out_w + out_x) * p->out_c + oc] =
                depthwise_point(p, in_b, p->in_w * p->in_c, p->in_c, ic, out_y, out_x, oc, filter, bias);
          }
        }
      }
    }
  }
}

void el_depthwise_conv2d_inplace(const el_conv_params *p, int8_t *buffer, const int8_t *filter,
                                 const int32_t *bias, int8_t *scratch) {
  int32_t c, i, out_y, out_x;
  for (c = 0; c < p->in_c; ++c) {
    /* output channel c only overwrites bytes that held input channel c (index mod C) */
    for (i = 0; i < p->in_h * p->in_w; ++i) scratch[i] = buffer[i * p->in_c + c];
    for (out_y = 0; out_y < p->out_h; ++out_y) {
      for (out_x = 0; out_x < p->out_w; ++out_x) {
        buffer[(out_y * p->out_w + out_x) * p->out_c + c] =
            depthwise_point(p, scratch, p->in_w, 1, 0, out_y, out_x, c, filter, bias);
      }
    }
  }
}

/* ---- reference_integer_ops::AveragePool / MaxPool ----------------------------------------- */
typedef struct { int32_t x_start, x_end, y_start, y_end, in_x_origin, in_y_origin; } pool_window;

static pool_window window_at(const el_pool_params *p, int32_t out_y, int32_t out_x) {
  pool_window w;
  w.in_x_origin = out_x * p->stride_w - p->pad_w;
  w.in_y_origin = out_y * p->stride_h - p->pad_h;
  w.x_start = w.in_x_origin < 0 ? -w.in_x_origin : 0;
  w.x_end = p->filter_w < p->in_w - w.in_x_origin ? p->filter_w : p->in_w - w.in_x_origin;
  w.y_start = w.in_y_origin < 0 ? -w.in_y_origin : 0;
  w.y_end = p->filter_h < p->in_h - w.in_y_origin ? p->filter_h : p->in_h - w.in_y_origin;
  return w;
}

static void pool2d(const el_pool_params *p, const int8_t *input, int8_t *output, int is_max) {
  int32_t batch, out_y, out_x, ch, fy, fx;
  for (batch = 0; batch < p->batches; ++batch) {
    for (out_y = 0; out_y < p->out_h; ++out_y) {
      for (out_x = 0; out_x < p->out_w; ++out_x) {
        const pool_window w = window_at(p, out_y, out_x);
        for (ch = 0; ch < p->depth; ++ch) {
          int32_t acc = is_max ? -128 : 0, count = 0;
          for (fy = w.y_start; fy < w.y_end; ++fy) {
            for (fx = w.x_start; fx < w.x_end; ++fx) {
              const int32_t v = input[((batch * p->in_h + w.in_y_origin + fy) * p->in_w + w.in_x_origin + fx) * p->depth + ch];
              if (is_max) acc = v > acc ? v : acc;
              else acc += v;
              count++;
            }
          }
          if (!is_max && count > 0) acc = acc > 0 ? (acc + count / 2) / count : (acc - count / 2) / count;
          output[((batch * p->out_h + out_y) * p->out_w + out_x) * p->depth + ch] =
              (int8_t)clamp32(acc, p->act_min, p->act_max);
        }
      }
    }
  }
}

void el_average_pool2d(const el_pool_params *p, const int8_t *input, int8_t *output) { pool2d(p, input, output, 0); }
void el_max_pool2d(const el_pool_params *p, const int8_t *input, int8_t *output) { pool2d(p, input, output, 1); }

/* ---- ADD / SUB (reference_integer_ops::AddFunc, reference_ops SubElementwise), MUL ------- */
typedef int8_t (*binary_fn)(const el_arith_params *p, int32_t x, int32_t y);

static int8_t add_fn(const el_arith_params *p, int32_t x, int32_t y) {
  const int32_t a = MBQM((x + p->input1_offset) * (1 << p->left_shift), p->input1_multiplier, p->input1_shift);
  const int32_t b = MBQM((y + p->input2_offset) * (1 << p->left_shift), p->input2_multiplier, p->input2_shift);
  const int32_t out = MBQM(a + b, p->output_multiplier, p->output_shift) + p->output_offset;
  return (int8_t)clamp32(out, p->act_min, p->act_max);
}

/* CONV_2D whose only reader is an ADD with a same-shape other input: each convolution value is
 * added to the other input's value at the same index as soon as it is computed, so the
 * convolution's output is never stored, and the sum may overwrite the other input (each element
 * is read once, just before it is written). conv_first: the convolution is the ADD's input 1.
 * Term for term el_conv2d then el_add. */
void el_conv2d_add(const el_conv_params *pc, const int8_t *input, const int8_t *filter, const int32_t *bias,
                   const el_arith_params *pa, const int8_t *other, int8_t *output, int32_t conv_first) {
  int32_t out_y, out_x, oc, i = 0;
  for (out_y = 0; out_y < pc->out_h; ++out_y)
    for (out_x = 0; out_x < pc->out_w; ++out_x)
      for (oc = 0; oc < pc->out_c; ++oc, ++i) {
        const int32_t v = conv_point(pc, input, filter, bias, 0, out_y, out_x, oc), o = other[i];
        output[i] = conv_first ? add_fn(pa, v, o) : add_fn(pa, o, v);
      }
}

static int8_t sub_fn(const el_arith_params *p, int32_t x, int32_t y) {
  const int32_t a = MBQM((x + p->input1_offset) * (1 << p->left_shift), p->input1_multiplier, p->input1_shift);
  const int32_t b = MBQM((y + p->input2_offset) * (1 << p->left_shift), p->input2_multiplier, p->input2_shift);
  const int32_t out = MBQM(a - b, p->output_multiplier, p->output_shift) + p->output_offset;
  return (int8_t)clamp32(out, p->act_min, p->act_max);
}

static int8_t mul_fn(const el_arith_params *p, int32_t x, int32_t y) {
  const int32_t out = p->output_offset +
                      MBQM((x + p->input1_offset) * (y + p->input2_offset), p->output_multiplier, p->output_shift);
  return (int8_t)clamp32(out, p->act_min, p->act_max);
}

static void broadcast_binary(const el_arith_params *p, const int8_t *in1, const int8_t *in2,
                             int8_t *output, binary_fn fn) {
  const int32_t *d = p->out_dims, *s1 = p->in1_strides, *s2 = p->in2_strides;
  int32_t i0, i1, i2, i3, i4, i5, o = 0;
  for (i0 = 0; i0 < d[0]; ++i0)
    for (i1 = 0; i1 < d[1]; ++i1)
      for (i2 = 0; i2 < d[2]; ++i2)
        for (i3 = 0; i3 < d[3]; ++i3)
          for (i4 = 0; i4 < d[4]; ++i4)
            for (i5 = 0; i5 < d[5]; ++i5) {
              const int32_t a = i0 * s1[0] + i1 * s1[1] + i2 * s1[2] + i3 * s1[3] + i4 * s1[4] + i5 * s1[5];
              const int32_t b = i0 * s2[0] + i1 * s2[1] + i2 * s2[2] + i3 * s2[3] + i4 * s2[4] + i5 * s2[5];
              output[o++] = fn(p, in1[a], in2[b]);
            }
}

/* MAXIMUM / MINIMUM (reference_ops::MaximumMinimumBroadcastSlow): raw int8 values, one quantization */
static int8_t max_fn(const el_arith_params *p, int32_t x, int32_t y) { (void)p; return (int8_t)(x > y ? x : y); }
static int8_t min_fn(const el_arith_params *p, int32_t x, int32_t y) { (void)p; return (int8_t)(x < y ? x : y); }
void el_maximum(const el_arith_params *p, const int8_t *in1, const int8_t *in2, int8_t *output) { broadcast_binary(p, in1, in2, output, max_fn); }
void el_minimum(const el_arith_params *p, const int8_t *in1, const int8_t *in2, int8_t *output) { broadcast_binary(p, in1, in2, output, min_fn); }

void el_add(const el_arith_params *p, const int8_t *in1, const int8_t *in2, int8_t *output) { broadcast_binary(p, in1, in2, output, add_fn); }
void el_sub(const el_arith_params *p, const int8_t *in1, const int8_t *in2, int8_t *output) { broadcast_binary(p, in1, in2, output, sub_fn); }
void el_mul(const el_arith_params *p, const int8_t *in1, const int8_t *in2, int8_t *output) { broadcast_binary(p, in1, in2, output, mul_fn); }

/* ---- reference_ops::Softmax (int8 -> int8) and common.h GetReciprocal -------------------- */
static int count_leading_zeros(uint32_t x) {
  int n = 0;
  if (x == 0) return 32;
  while (!(x & 0x80000000u)) { x <<= 1; n++; }
  return n;
}

void el_softmax(const el_softmax_params *p, const int8_t *input, int8_t *output) {
  int32_t i, c;
  for (i = 0; i < p->outer; ++i) {
    const int8_t *x = input + i * p->depth;
    int8_t *y = output + i * p->depth;
    int32_t max_in_row = -128, sum_of_exps = 0, shifted_scale, exponent, headroom_plus_one;
    for (c = 0; c < p->depth; ++c) max_in_row = x[c] > max_in_row ? x[c] : max_in_row;
    for (c = 0; c < p->depth; ++c) {
      const int32_t diff = (int32_t)x[c] - max_in_row;
      if (diff >= p->diff_min) {
        const int32_t rescaled = srdhm(diff * (1 << p->input_left_shift), p->input_multiplier);
        sum_of_exps = wrap_add(sum_of_exps, rdbpot(exp_on_negative_values(rescaled, 5), 12));
      }
    }
    headroom_plus_one = count_leading_zeros((uint32_t)sum_of_exps);
    shifted_scale = one_over_one_plus_x_for_x_in_0_1(
        (int32_t)(((uint32_t)sum_of_exps << headroom_plus_one) - (1u << 31)));
    exponent = (12 - headroom_plus_one) + 31 - 8;
    for (c = 0; c < p->depth; ++c) {
      const int32_t diff = (int32_t)x[c] - max_in_row;
      if (diff >= p->diff_min) {
        const int32_t rescaled = srdhm(diff * (1 << p->input_left_shift), p->input_multiplier);
        const int32_t exp_in_0 = exp_on_negative_values(rescaled, 5);
        const int32_t unsat = rdbpot(srdhm(shifted_scale, exp_in_0), exponent);
        y[c] = (int8_t)clamp32(unsat - 128, -128, 127);
      } else {
        y[c] = -128;
      }
    }
  }
}

/* ---- reference_ops::QuantizedMeanOrSum (mean) -------------------------------------------- */
static int32_t offset_of(int32_t index, const int32_t *dims, const int32_t *strides) {
  int32_t offset = 0, k;
  for (k = EL_MAX_DIMS - 1; k >= 0; --k) {
    offset += (index % dims[k]) * strides[k];
    index /= dims[k];
  }
  return offset;
}

void el_mean(const el_mean_params *p, const int8_t *input, int8_t *output) {
  int32_t o, r;
  for (o = 0; o < p->num_outputs; ++o) {
    const int32_t base = offset_of(o, p->keep_dims, p->keep_strides);
    int32_t sum = 0, out;
    for (r = 0; r < p->num_reduced; ++r) sum += input[base + offset_of(r, p->red_dims, p->red_strides)];
    out = MBQM(sum - p->input_zero_point * p->num_reduced, p->multiplier, p->shift) + p->output_zero_point;
    output[o] = (int8_t)clamp32(out, -128, 127);
  }
}

/* ---- reference_ops::Pad, Transpose, Concatenation, Reshape (copy) ------------------------ */
void el_pad(const el_pad_params *p, const int8_t *input, int8_t *output) {
  int32_t total = 1, o, k;
  for (k = 0; k < EL_MAX_DIMS; ++k) total *= p->out_dims[k];
  for (o = 0; o < total; ++o) {
    int32_t index = o, offset = 0, inside = 1;
    for (k = EL_MAX_DIMS - 1; k >= 0; --k) {
      const int32_t coord = index % p->out_dims[k] - p->before[k];
      index /= p->out_dims[k];
      if (coord < 0 || coord >= p->in_dims[k]) inside = 0;
      offset += coord * p->in_strides[k];
    }
    output[o] = inside ? input[offset] : p->pad_value;
  }
}

void el_transpose(const el_transpose_params *p, const int8_t *input, int8_t *output) {
  int32_t total = 1, o, k;
  for (k = 0; k < EL_MAX_DIMS; ++k) total *= p->out_dims[k];
  for (o = 0; o < total; ++o) output[o] = input[offset_of(o, p->out_dims, p->in_strides)];
}

void el_concatenation(int32_t outer, int32_t count, const int8_t *const *inputs,
                      const int32_t *chunk_sizes, int8_t *output) {
  int32_t k, i;
  for (k = 0; k < outer; ++k) {
    for (i = 0; i < count; ++i) {
      memcpy(output, inputs[i] + k * chunk_sizes[i], (size_t)chunk_sizes[i]);
      output += chunk_sizes[i];
    }
  }
}

void el_copy(int32_t size, const int8_t *input, int8_t *output) {
  if (input != output) memmove(output, input, (size_t)size);
}

/* ---- reference_integer_ops::Logistic / Tanh, reference_ops::HardSwish, Requantize -------- */
void el_logistic(const el_sigmoid_params *p, const int8_t *input, int8_t *output) {
  int32_t i;
  for (i = 0; i < p->size; ++i) {
    const int32_t x = (int32_t)input[i] - p->input_zero_point;
    if (x <= -p->input_range_radius) {
      output[i] = -128;
    } else if (x >= p->input_range_radius) {
      output[i] = 127;
    } else {
      const int32_t q4 = MBQM(x, p->input_multiplier, p->input_left_shift);
      const int32_t q23 = rdbpot(fixed_logistic_q4(q4), 31 - 8);
      output[i] = (int8_t)clamp32(q23 - 128, -128, 127);
    }
  }
}

void el_tanh(const el_sigmoid_params *p, const int8_t *input, int8_t *output) {
  int32_t i;
  for (i = 0; i < p->size; ++i) {
    const int32_t x = (int32_t)input[i] - p->input_zero_point;
    if (x <= -p->input_range_radius) {
      output[i] = -128;
    } else if (x >= p->input_range_radius) {
      output[i] = 127;
    } else {
      const int32_t q4 = MBQM(x, p->input_multiplier, p->input_left_shift);
      output[i] = (int8_t)clamp32(rdbpot(fixed_tanh_q4(q4), 31 - 7), -128, 127);
    }
  }
}

static int16_t saturating_left_shift16(int16_t value, int amount) {
  int64_t result = (int64_t)value * ((int64_t)1 << amount);
  if (result > INT16_MAX) result = INT16_MAX;
  if (result < INT16_MIN) result = INT16_MIN;
  return (int16_t)result;
}

static int16_t saturating_doubling_high_mul16(int16_t a, int16_t b) {
  const int overflow = a == b && a == INT16_MIN;
  const int32_t ab = (int32_t)a * (int32_t)b;
  return overflow ? INT16_MAX : (int16_t)(ab / (1 << 15));
}

void el_hard_swish(const el_hard_swish_params *p, const int8_t *input, int8_t *output) {
  int32_t i;
  for (i = 0; i < p->size; ++i) {
    const int16_t value = (int16_t)(input[i] - p->input_zero_point);
    const int16_t hires = (int16_t)(value * (1 << 7));
    const int16_t preshift_output = srdhm16(hires, p->output_multiplier_fixedpoint_int16);
    int16_t reluish = hires, out;
    if (p->reluish_multiplier_exponent > 0) reluish = saturating_left_shift16(reluish, p->reluish_multiplier_exponent - 1);
    reluish = srdhm16(reluish, p->reluish_multiplier_fixedpoint_int16);
    if (p->reluish_multiplier_exponent > 0) reluish = saturating_left_shift16(reluish, 1);
    if (p->reluish_multiplier_exponent < 0) reluish = rdbpot16(reluish, -p->reluish_multiplier_exponent);
    reluish = (int16_t)((reluish + (1 << 15)) >> 1);
    out = rdbpot16(saturating_doubling_high_mul16(reluish, preshift_output), -p->output_multiplier_exponent);
    out = (int16_t)(out + p->output_zero_point);
    output[i] = (int8_t)(out > 127 ? 127 : (out < -128 ? -128 : out));
  }
}

/* RELU, RELU6, RELU_N1_TO_1 (activations_common.cc ReluQuantized): rescale, then clamp to the
 * activation's range in the output's quantization. */
void el_relu(const el_relu_params *p, const int8_t *input, int8_t *output) {
  int32_t i;
  for (i = 0; i < p->size; ++i) {
    const int32_t v = p->output_offset + MBQM((int32_t)input[i] - p->input_offset, p->multiplier, p->shift);
    output[i] = (int8_t)clamp32(v, p->act_min, p->act_max);
  }
}

void el_requantize(const el_requantize_params *p, const int8_t *input, int8_t *output) {
  int32_t i;
  for (i = 0; i < p->size; ++i) {
    const int32_t out = MBQM((int32_t)input[i] - p->input_zero_point, p->multiplier, p->shift) + p->output_zero_point;
    output[i] = (int8_t)clamp32(out, -128, 127);
  }
}
