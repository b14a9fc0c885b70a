// XXH3-64 (seed 0, default secret) of KV blocks where they landed in GPU memory.
//
// kvstore checks every block against the xxh3_64 its writer computed. On a GPU
// cache the bytes land in the engine's pages, so hashing them there checks what
// attention will read, costs no host memory bandwidth and no Python threads.
// A block is num_parts parts of part_bytes each (a layer's K or V page), part p
// at base + block_offsets[b] + p * part_stride; the hash is over the parts in
// order, as the stored payload lays them out. Only the long-input path (> 240
// bytes) and part_bytes % 64 == 0 are handled; engines/block_checksum.py checks
// both and holds the numpy reference this kernel is tested against.
//
// A warp hashes one block: eight accumulator lanes, each split four ways over
// the stripes of every 1 KB block. XXH3's lanes only meet in the final merge:
// lane i adds its own key product and its neighbour's (i ^ 1) input word, and
// the scramble is per lane. With eight threads a block (one per lane) the
// kernel was latency-bound: 460 blocks of 512 KB took 2.1 ms on an H100 and
// held 29 SMs away from the forward pass it runs beside.

// NVRTC compiles this without a C library: no <stdint.h>.
typedef unsigned long long uint64_t;

#define PRIME32_1 0x9E3779B1ULL
#define PRIME32_2 0x85EBCA77ULL
#define PRIME32_3 0xC2B2AE3DULL
#define PRIME64_1 0x9E3779B185EBCA87ULL
#define PRIME64_2 0xC2B2AE3D27D4EB4FULL
#define PRIME64_3 0x165667B19E3779F9ULL
#define PRIME64_4 0x85EBCA77C2B2AE63ULL
#define PRIME64_5 0x27D4EB2F165667C5ULL

__constant__ unsigned char kSecret[192] = {
    0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad, 0x1c,
    0xde, 0xd4, 0x6d, 0xe9, 0x83, 0x90, 0x97, 0xdb, 0x72, 0x40, 0xa4, 0xa4, 0xb7, 0xb3, 0x67, 0x1f,
    0xcb, 0x79, 0xe6, 0x4e, 0xcc, 0xc0, 0xe5, 0x78, 0x82, 0x5a, 0xd0, 0x7d, 0xcc, 0xff, 0x72, 0x21,
    0xb8, 0x08, 0x46, 0x74, 0xf7, 0x43, 0x24, 0x8e, 0xe0, 0x35, 0x90, 0xe6, 0x81, 0x3a, 0x26, 0x4c,
    0x3c, 0x28, 0x52, 0xbb, 0x91, 0xc3, 0x00, 0xcb, 0x88, 0xd0, 0x65, 0x8b, 0x1b, 0x53, 0x2e, 0xa3,
    0x71, 0x64, 0x48, 0x97, 0xa2, 0x0d, 0xf9, 0x4e, 0x38, 0x19, 0xef, 0x46, 0xa9, 0xde, 0xac, 0xd8,
    0xa8, 0xfa, 0x76, 0x3f, 0xe3, 0x9c, 0x34, 0x3f, 0xf9, 0xdc, 0xbb, 0xc7, 0xc7, 0x0b, 0x4f, 0x1d,
    0x8a, 0x51, 0xe0, 0x4b, 0xcd, 0xb4, 0x59, 0x31, 0xc8, 0x9f, 0x7e, 0xc9, 0xd9, 0x78, 0x73, 0x64,
    0xea, 0xc5, 0xac, 0x83, 0x34, 0xd3, 0xeb, 0xc3, 0xc5, 0x81, 0xa0, 0xff, 0xfa, 0x13, 0x63, 0xeb,
    0x17, 0x0d, 0xdd, 0x51, 0xb7, 0xf0, 0xda, 0x49, 0xd3, 0x16, 0x55, 0x26, 0x29, 0xd4, 0x68, 0x9e,
    0x2b, 0x16, 0xbe, 0x58, 0x7d, 0x47, 0xa1, 0xfc, 0x8f, 0xf8, 0xb8, 0xd1, 0x7a, 0xd0, 0x31, 0xce,
    0x45, 0xcb, 0x3a, 0x8f, 0x95, 0x16, 0x04, 0x28, 0xaf, 0xd7, 0xfb, 0xca, 0xbb, 0x4b, 0x40, 0x7e,
};

__device__ __forceinline__ uint64_t secret64(int offset) {
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v |= (uint64_t)kSecret[offset + i] << (8 * i);
    return v;
}

__device__ __forceinline__ uint64_t mul128_fold64(uint64_t a, uint64_t b) {
    return (a * b) ^ __umul64hi(a, b);
}

__device__ __forceinline__ uint64_t key_product(uint64_t own, uint64_t key_secret) {
    uint64_t key = own ^ key_secret;
    return (key & 0xFFFFFFFFULL) * (key >> 32);
}

#define FULL_MASK 0xFFFFFFFFu
#define AHEAD 4  // 1 KB blocks whose words a thread loads before folding the first: loads in flight

extern "C" __global__ void xxh3_64_paged(const unsigned char* base, const long long* block_offsets, int num_blocks,
                                         long long part_stride, long long part_bytes, int num_parts,
                                         unsigned long long* out) {
    // One warp hashes one block; whole warps leave together, so every shuffle has its partners.
    const int block = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (block >= num_blocks) return;
    const int t = threadIdx.x & 31, lane = t & 7, group = t >> 3;
    const long long len = part_bytes * num_parts;
    const unsigned char* start = base + block_offsets[block];
    const int stripes_per_part = (int)(part_bytes / 64);
    // Stripe g of the block (its g-th 64 bytes of input, across parts); this thread's word of it.
#define WORD(g) (*(const uint64_t*)(start + (long long)((g) / stripes_per_part) * part_stride + \
                                    (long long)((g) % stripes_per_part) * 64 + lane * 8))

    const uint64_t init[8] = {PRIME32_3, PRIME64_1, PRIME64_2, PRIME64_3, PRIME64_4, PRIME32_2, PRIME64_5, PRIME32_1};
    uint64_t acc = init[lane];
    uint64_t stripe_secret[4];  // stripes group, group + 4, + 8, + 12 of each 1 KB block are this thread's
#pragma unroll
    for (int k = 0; k < 4; k++) stripe_secret[k] = secret64((group + 4 * k) * 8 + lane * 8);
    const uint64_t scramble_secret = secret64(128 + lane * 8);

    // Lane i's sum over a 1 KB block is order-free (addition mod 2^64), so the four groups each
    // take four of its sixteen stripes and two shuffles add them; the scramble between blocks
    // keeps the walk over blocks sequential.
    const int nb_blocks = (int)((len - 1) / 1024);
    for (int n0 = 0; n0 < nb_blocks; n0 += AHEAD) {
        uint64_t words[AHEAD][4];
#pragma unroll
        for (int u = 0; u < AHEAD; u++)
#pragma unroll
            for (int k = 0; k < 4; k++)
                words[u][k] = (n0 + u < nb_blocks) ? WORD((n0 + u) * 16 + group + 4 * k) : 0;
#pragma unroll
        for (int u = 0; u < AHEAD; u++) {
            if (n0 + u >= nb_blocks) break;  // the same for the whole warp
            uint64_t delta = 0;
#pragma unroll
            for (int k = 0; k < 4; k++)
                delta += __shfl_xor_sync(FULL_MASK, words[u][k], 1) + key_product(words[u][k], stripe_secret[k]);
            delta += __shfl_xor_sync(FULL_MASK, delta, 8);
            delta += __shfl_xor_sync(FULL_MASK, delta, 16);
            acc += delta;
            acc ^= acc >> 47;
            acc ^= scramble_secret;
            acc *= PRIME32_1;
        }
    }
    const int tail_stripes = (int)(((len - 1) - 1024LL * nb_blocks) / 64);
    uint64_t delta = 0;
#pragma unroll
    for (int k = 0; k < 4; k++) {
        const bool mine = group + 4 * k < tail_stripes;  // the same for a thread and its neighbour
        const uint64_t own = mine ? WORD(nb_blocks * 16 + group + 4 * k) : 0;
        const uint64_t neighbour = __shfl_xor_sync(FULL_MASK, own, 1);
        if (mine) delta += neighbour + key_product(own, stripe_secret[k]);
    }
    delta += __shfl_xor_sync(FULL_MASK, delta, 8);
    delta += __shfl_xor_sync(FULL_MASK, delta, 16);
    acc += delta;
#undef WORD
    // The last stripe is the block's final 64 bytes, the last part's end; every group adds it alike.
    const uint64_t* last = (const uint64_t*)(start + (long long)(num_parts - 1) * part_stride + part_bytes - 64);
    const uint64_t own = last[lane];
    acc += __shfl_xor_sync(FULL_MASK, own, 1) + key_product(own, secret64(192 - 64 - 7 + lane * 8));

    uint64_t accs[8];
#pragma unroll
    for (int i = 0; i < 8; i++) accs[i] = __shfl_sync(FULL_MASK, acc, i);
    if (t == 0) {
        uint64_t h = (uint64_t)len * PRIME64_1;
#pragma unroll
        for (int i = 0; i < 4; i++)
            h += mul128_fold64(accs[2 * i] ^ secret64(11 + 16 * i), accs[2 * i + 1] ^ secret64(11 + 16 * i + 8));
        h ^= h >> 37;
        h *= 0x165667919E3779F9ULL;
        h ^= h >> 32;
        out[block] = h;
    }
}
