// Batched softmax top-k over a large label space (54,092 classes), without a sort.
// Contract and NumPy reference: softmax_topk in topk.py.
//
// One block per row. The row is read five times from global memory (L2 holds a
// 216 KB row; shared memory cannot on sm_80), and only k results are written:
//   1. radix select, 4 passes of 8 bits over order keys: the k-th largest key T,
//      and how many keys equal to T belong to the top k (`remaining`);
//      the first pass also finds the row maximum;
//   2. one pass that sums exp(x - max) and gathers the winners: keys above T in
//      any order (an atomic counter), keys equal to T in class order (a block scan),
//      so ties go to the lower class id as in the reference;
//   3. each of the k winners counts the winners ahead of it: its rank, O(k^2) with
//      k <= 1024 in shared memory, instead of a sort.
//
// Order keys map float32 to uint32 so that unsigned order is the reference's order:
// every NaN above +inf (NumPy sorts NaN last), -0.0 equal to +0.0.

#define BLOCK 1024
#define MAX_K BLOCK
#define WARPS (BLOCK / 32)
#define FULL_MASK 0xFFFFFFFFu
#define NO_BIN 256

__device__ __forceinline__ unsigned int order_key(float x) {
    unsigned int b = __float_as_uint(x);
    if (x != x) {
        b = 0x7FFFFFFFu;  // one NaN, the largest key
    } else if (x == 0.0f) {
        b = 0u;  // -0.0 ties with +0.0
    }
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ float key_value(unsigned int key) {
    return __uint_as_float((key & 0x80000000u) ? (key ^ 0x80000000u) : ~key);
}

extern "C" __global__ void __launch_bounds__(BLOCK) softmax_topk_f32(
    const float* __restrict__ logits, long long row_stride, int num_classes, int k,
    float* __restrict__ out_scores, long long* __restrict__ out_ids) {
    __shared__ unsigned int hist[256];
    __shared__ unsigned int cand_key[MAX_K];
    __shared__ int cand_id[MAX_K];
    __shared__ unsigned int warp_count[WARPS];
    __shared__ float warp_sum[WARPS];
    __shared__ unsigned int s_prefix, s_remaining, s_max_key, s_above;
    __shared__ float s_sum;

    const float* row = logits + (long long)blockIdx.x * row_stride;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

    // ---- 1. radix select ------------------------------------------------------
    unsigned int prefix = 0u, mask = 0u, remaining = (unsigned int)k;
    if (tid == 0) {
        s_max_key = 0u;
        s_above = 0u;
    }
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = tid; i < 256; i += BLOCK) hist[i] = 0u;
        __syncthreads();
        unsigned int max_key = 0u;
        // `base` is uniform across the block, so every lane reaches __match_any_sync.
        for (int base = 0; base < num_classes; base += BLOCK) {
            const int i = base + tid;
            int bin = NO_BIN;
            if (i < num_classes) {
                const unsigned int key = order_key(row[i]);
                max_key = max(max_key, key);
                if ((key & mask) == prefix) bin = (key >> shift) & 0xFF;
            }
            // Logits crowd a few exponents, so many lanes hit one bin: one atomic per
            // distinct bin in the warp instead of one per lane.
            const unsigned int peers = __match_any_sync(FULL_MASK, bin);
            if (bin != NO_BIN && lane == __ffs(peers) - 1) atomicAdd(&hist[bin], __popc(peers));
        }
        if (shift == 24) {
            max_key = __reduce_max_sync(FULL_MASK, max_key);
            if (lane == 0) atomicMax(&s_max_key, max_key);
        }
        __syncthreads();
        if (tid == 0) {
            // Walk the digits from the top until the k-th largest key is inside one.
            unsigned int above = 0u;
            int digit = 255;
            while (digit > 0 && above + hist[digit] < remaining) above += hist[digit--];
            s_prefix = prefix | ((unsigned int)digit << shift);
            s_remaining = remaining - above;
        }
        __syncthreads();
        prefix = s_prefix;
        remaining = s_remaining;
        mask |= 0xFFu << shift;
    }
    const unsigned int threshold = prefix;         // the k-th largest key
    const unsigned int n_above = k - remaining;    // keys > threshold, all winners
    const float row_max = key_value(s_max_key);    // NaN if the row holds one

    // ---- 2. softmax denominator and the winners --------------------------------
    float sum = 0.0f;
    unsigned int equal_before = 0u;  // keys == threshold in earlier chunks, same in every thread
    for (int base = 0; base < num_classes; base += BLOCK) {
        const int i = base + tid;
        unsigned int key = 0u;
        bool equal = false;
        if (i < num_classes) {
            const float x = row[i];
            sum += expf(x - row_max);
            key = order_key(x);
            if (key > threshold) {
                const unsigned int slot = atomicAdd(&s_above, 1u);
                cand_key[slot] = key;
                cand_id[slot] = i;
            }
            equal = key == threshold;
        }
        const unsigned int ballot = __ballot_sync(FULL_MASK, equal);
        if (lane == 0) warp_count[warp] = __popc(ballot);
        __syncthreads();
        unsigned int chunk_total = 0u, rank = equal_before + __popc(ballot & ((1u << lane) - 1u));
        for (int w = 0; w < WARPS; ++w) {
            chunk_total += warp_count[w];
            if (w < warp) rank += warp_count[w];
        }
        if (equal && rank < remaining) {
            cand_key[n_above + rank] = key;
            cand_id[n_above + rank] = i;
        }
        equal_before += chunk_total;
        __syncthreads();  // warp_count is rewritten by the next chunk
    }
    for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_down_sync(FULL_MASK, sum, offset);
    if (lane == 0) warp_sum[warp] = sum;
    __syncthreads();
    if (tid == 0) {
        float total = 0.0f;
        for (int w = 0; w < WARPS; ++w) total += warp_sum[w];
        s_sum = total;
    }
    __syncthreads();

    // ---- 3. rank the k winners and write them best first -----------------------
    if (tid < k) {
        const unsigned int key = cand_key[tid];
        const int id = cand_id[tid];
        int place = 0;
        for (int j = 0; j < k; ++j) {
            const unsigned int other = cand_key[j];
            place += (other > key) || (other == key && cand_id[j] < id);
        }
        const long long out = (long long)blockIdx.x * k + place;
        out_scores[out] = expf(row[id] - row_max) / s_sum;
        out_ids[out] = id;
    }
}
