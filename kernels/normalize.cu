// Fused uint8 NHWC -> normalised NCHW half precision (fp16 or bf16).
// Contract and NumPy reference: normalize.py.
//
//   dst[n, c, h, w] = round_rne(float(src[n, h, w, channels[c]]) * scale[c] + bias[c])
//
// with scale = 1 / (255 std) and bias = -mean / std computed once on the host in
// float32. The multiply and the add are rounded separately (__fmul_rn, __fadd_rn)
// rather than contracted into an FMA, so the float32 value, and with it the rounded
// half, is bit-identical to NumPy's x * scale + bias.
//
// No headers: the conversions are single PTX instructions (round to nearest even,
// as NumPy's astype(float16)), so NVRTC needs no include path here or in CI.

__device__ __forceinline__ unsigned short to_half_bits(float v) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    return h;
}

__device__ __forceinline__ unsigned short to_bfloat16_bits(float v) {
    unsigned short h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v));  // sm_80+
    return h;
}

struct ToHalf {
    __device__ static unsigned short cvt(float v) { return to_half_bits(v); }
};
struct ToBfloat16 {
    __device__ static unsigned short cvt(float v) { return to_bfloat16_bits(v); }
};

// Grid: x covers the pixels of one image (grid-stride), y is the image index, so
// no thread divides a 64-bit index. One thread per pixel: a warp reads 32 adjacent
// pixels (contiguous bytes) and writes 32 adjacent halves to each of three planes.
template <typename Out>
__device__ __forceinline__ void normalize_impl(
    const unsigned char* __restrict__ src, unsigned short* __restrict__ dst,
    long long pixels, int in_channels,
    int c0, int c1, int c2,
    float s0, float s1, float s2,
    float b0, float b1, float b2) {
    const long long image = blockIdx.y;
    const unsigned char* in = src + image * pixels * in_channels;
    unsigned short* out = dst + image * 3 * pixels;
    const long long step = (long long)blockDim.x * gridDim.x;
    for (long long p = (long long)blockIdx.x * blockDim.x + threadIdx.x; p < pixels; p += step) {
        const unsigned char* px = in + p * in_channels;
        out[p] = Out::cvt(__fadd_rn(__fmul_rn((float)px[c0], s0), b0));
        out[pixels + p] = Out::cvt(__fadd_rn(__fmul_rn((float)px[c1], s1), b1));
        out[2 * pixels + p] = Out::cvt(__fadd_rn(__fmul_rn((float)px[c2], s2), b2));
    }
}

extern "C" __global__ void __launch_bounds__(256) nhwc_u8_to_nchw_f16(
    const unsigned char* __restrict__ src, unsigned short* __restrict__ dst,
    long long pixels, int in_channels, int c0, int c1, int c2,
    float s0, float s1, float s2, float b0, float b1, float b2) {
    normalize_impl<ToHalf>(src, dst, pixels, in_channels, c0, c1, c2, s0, s1, s2, b0, b1, b2);
}

extern "C" __global__ void __launch_bounds__(256) nhwc_u8_to_nchw_bf16(
    const unsigned char* __restrict__ src, unsigned short* __restrict__ dst,
    long long pixels, int in_channels, int c0, int c1, int c2,
    float s0, float s1, float s2, float b0, float b1, float b2) {
    normalize_impl<ToBfloat16>(src, dst, pixels, in_channels, c0, c1, c2, s0, s1, s2, b0, b1, b2);
}
