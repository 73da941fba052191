/* edgeloop int8 kernels: plain C99 ports of TensorFlow Lite Micro's reference kernels
 * (tensorflow/lite/kernels/internal/reference/, micro/kernels/), bit-exact to them.
 *
 * Every kernel runs blindly: shapes, paddings, quantized multipliers and activation ranges
 * were checked and computed offline by the compiler (kernels/aot), as TFLM computes them in
 * Prepare. No kernel allocates, and none uses floating point. Tensors are NHWC (channels
 * last), row-major. Assumes two's complement, arithmetic right shift of negative values and
 * wrapping int32 conversions, as TFLM itself does (gcc, clang and armcc all qualify). */
#ifndef EDGELOOP_KERNELS_H
#define EDGELOOP_KERNELS_H

#include <stdint.h>

#define EL_MAX_DIMS 6

/* FULLY_CONNECTED: output[b][c] = requant(sum_d (w[c][d] + filter_offset) * (x[b][d] + input_offset) + bias[c]) */
typedef struct {
  int32_t batches, accum_depth, output_depth;
  int32_t input_offset, filter_offset, output_offset;
  int32_t act_min, act_max;
  const int32_t *multiplier, *shift; /* one per output channel */
} el_fc_params;

/* CONV_2D and DEPTHWISE_CONV_2D (NHWC input, OHWI filter for conv, 1HWO for depthwise). */
typedef struct {
  int32_t batches, in_h, in_w, in_c, out_h, out_w, out_c;
  int32_t filter_h, filter_w, filter_in_c, depth_multiplier;
  int32_t stride_h, stride_w, dilation_h, dilation_w, pad_h, pad_w;
  int32_t input_offset, output_offset, act_min, act_max;
  const int32_t *multiplier, *shift; /* one per output channel */
} el_conv_params;

/* AVERAGE_POOL_2D and MAX_POOL_2D */
typedef struct {
  int32_t batches, in_h, in_w, depth, out_h, out_w;
  int32_t filter_h, filter_w, stride_h, stride_w, pad_h, pad_w;
  int32_t act_min, act_max;
} el_pool_params;

/* ADD, SUB, MUL with broadcasting: dims and strides padded to EL_MAX_DIMS, stride 0 broadcasts. */
typedef struct {
  int32_t out_dims[EL_MAX_DIMS], in1_strides[EL_MAX_DIMS], in2_strides[EL_MAX_DIMS];
  int32_t input1_offset, input2_offset, output_offset, left_shift;
  int32_t input1_multiplier, input1_shift, input2_multiplier, input2_shift;
  int32_t output_multiplier, output_shift;
  int32_t act_min, act_max;
} el_arith_params;

/* SOFTMAX over the last axis (int8 in, int8 out with scale 1/256 and zero point -128). */
typedef struct {
  int32_t outer, depth, input_multiplier, input_left_shift, diff_min;
} el_softmax_params;

/* MEAN: kept axes (dims, input strides) and reduced axes (dims, input strides), padded. */
typedef struct {
  int32_t keep_dims[EL_MAX_DIMS], keep_strides[EL_MAX_DIMS];
  int32_t red_dims[EL_MAX_DIMS], red_strides[EL_MAX_DIMS];
  int32_t num_outputs, num_reduced, input_zero_point, output_zero_point;
  int32_t multiplier, shift; /* already divided by num_reduced, as TFLM does at run time */
} el_mean_params;

/* PAD and TRANSPOSE: output dims, input strides per output axis (padded to EL_MAX_DIMS). */
typedef struct {
  int32_t out_dims[EL_MAX_DIMS], in_dims[EL_MAX_DIMS], before[EL_MAX_DIMS], in_strides[EL_MAX_DIMS];
  int8_t pad_value;
} el_pad_params;

typedef struct {
  int32_t out_dims[EL_MAX_DIMS], in_strides[EL_MAX_DIMS];
} el_transpose_params;

/* RELU, RELU6, RELU_N1_TO_1 */
typedef struct {
  int32_t size, input_offset, output_offset, multiplier, shift, act_min, act_max;
} el_relu_params;
void el_relu(const el_relu_params *p, const int8_t *input, int8_t *output);

/* LOGISTIC and TANH (TFLM's int8 gemmlowp path, input in Q4.27). */
typedef struct {
  int32_t size, input_zero_point, input_range_radius, input_multiplier, input_left_shift;
} el_sigmoid_params;

typedef struct {
  int32_t size, input_zero_point, output_zero_point;
  int32_t output_multiplier_exponent, reluish_multiplier_exponent;
  int16_t output_multiplier_fixedpoint_int16, reluish_multiplier_fixedpoint_int16;
} el_hard_swish_params;

typedef struct {
  int32_t size, input_zero_point, output_zero_point, multiplier, shift;
} el_requantize_params;

int32_t el_multiply_by_quantized_multiplier(int32_t x, int32_t multiplier, int shift);

void el_fully_connected(const el_fc_params *p, const int8_t *input, const int8_t *filter,
                        const int32_t *bias, int8_t *output);
void el_conv2d(const el_conv_params *p, const int8_t *input, const int8_t *filter,
               const int32_t *bias, int8_t *output);
void el_depthwise_conv2d(const el_conv_params *p, const int8_t *input, const int8_t *filter,
                         const int32_t *bias, int8_t *output);
/* Depth multiplier 1, one batch, output written over the input one channel at a time (MIT
 * TinyEngine): scratch holds one input channel, in_h * in_w bytes. */
void el_pointwise_conv2d_inplace(const el_conv_params *p, int8_t *buffer, const int8_t *filter,
                                 const int32_t *bias, int8_t *scratch);
void el_depthwise_conv2d_inplace(const el_conv_params *p, int8_t *buffer, const int8_t *filter,
                                 const int32_t *bias, int8_t *scratch);
void el_average_pool2d(const el_pool_params *p, const int8_t *input, int8_t *output);
void el_max_pool2d(const el_pool_params *p, const int8_t *input, int8_t *output);
void el_add(const el_arith_params *p, const int8_t *in1, const int8_t *in2, int8_t *output);
void el_maximum(const el_arith_params *p, const int8_t *in1, const int8_t *in2, int8_t *output);
void el_minimum(const el_arith_params *p, const int8_t *in1, const int8_t *in2, int8_t *output);
void el_conv2d_add(const el_conv_params *pc, const int8_t *input, const int8_t *filter, const int32_t *bias,
                   const el_arith_params *pa, const int8_t *other, int8_t *output, int32_t conv_first);
void el_sub(const el_arith_params *p, const int8_t *in1, const int8_t *in2, int8_t *output);
void el_mul(const el_arith_params *p, const int8_t *in1, const int8_t *in2, int8_t *output);
void el_softmax(const el_softmax_params *p, const int8_t *input, int8_t *output);
void el_mean(const el_mean_params *p, const int8_t *input, int8_t *output);
void el_pad(const el_pad_params *p, const int8_t *input, int8_t *output);
void el_transpose(const el_transpose_params *p, const int8_t *input, int8_t *output);
void el_concatenation(int32_t outer, int32_t count, const int8_t *const *inputs,
                      const int32_t *chunk_sizes, int8_t *output);
void el_copy(int32_t size, const int8_t *input, int8_t *output);
void el_logistic(const el_sigmoid_params *p, const int8_t *input, int8_t *output);
void el_tanh(const el_sigmoid_params *p, const int8_t *input, int8_t *output);
void el_hard_swish(const el_hard_swish_params *p, const int8_t *input, int8_t *output);
void el_requantize(const el_requantize_params *p, const int8_t *input, int8_t *output);

#endif /* EDGELOOP_KERNELS_H */
