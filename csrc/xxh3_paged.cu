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
// Eight threads hash one block, one per accumulator lane. XXH3's lanes only
// meet in the final merge: lane i adds its own key product and its neighbour's
// (i ^ 1) input word, and the scramble is per lane, so no lane waits on another.

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

// A cursor over a block's parts: the logical offset advances 64 bytes at a time.
struct Cursor {
    const unsigned char* part;
    long long within;
    long long part_bytes;
    long long part_stride;
    __device__ __forceinline__ const uint64_t* stripe() const { return (const uint64_t*)(part + within); }
    __device__ __forceinline__ void advance() {
        within += 64;
        if (within == part_bytes) { within = 0; part += part_stride; }
    }
};

__device__ __forceinline__ void accumulate(uint64_t& acc, const uint64_t* stripe, int lane, uint64_t key_secret) {
    uint64_t own = stripe[lane];
    uint64_t key = own ^ key_secret;
    acc += stripe[lane ^ 1] + (key & 0xFFFFFFFFULL) * (key >> 32);
}

extern "C" __global__ void xxh3_64_paged(const unsigned char* base, const long long* block_offsets, int num_blocks,
                                         long long part_stride, long long part_bytes, int num_parts,
                                         unsigned long long* out) {
    // Launched with a multiple of 32 threads a CUDA block, so whole warps take part in the
    // final shuffle; surplus groups hash the last block again and write nothing.
    int tid = blockIdx.x * blockDim.x + threadIdx.x;
    const bool surplus = (tid >> 3) >= num_blocks;
    int block = surplus ? num_blocks - 1 : tid >> 3;
    int lane = tid & 7;
    const long long len = part_bytes * num_parts;

    const uint64_t init[8] = {PRIME32_3, PRIME64_1, PRIME64_2, PRIME64_3, PRIME64_4, PRIME32_2, PRIME64_5, PRIME32_1};
    uint64_t acc = init[lane];
    uint64_t stripe_secret[16];
#pragma unroll
    for (int s = 0; s < 16; s++) stripe_secret[s] = secret64(s * 8 + lane * 8);
    const uint64_t scramble_secret = secret64(128 + lane * 8);

    Cursor c{base + block_offsets[block], 0, part_bytes, part_stride};
    const long long nb_blocks = (len - 1) / 1024;
    for (long long n = 0; n < nb_blocks; n++) {
#pragma unroll
        for (int s = 0; s < 16; s++) {
            accumulate(acc, c.stripe(), lane, stripe_secret[s]);
            c.advance();
        }
        acc ^= acc >> 47;
        acc ^= scramble_secret;
        acc *= PRIME32_1;
    }
    const int tail_stripes = (int)(((len - 1) - 1024 * nb_blocks) / 64);
    for (int s = 0; s < tail_stripes; s++) {
        accumulate(acc, c.stripe(), lane, stripe_secret[s]);
        c.advance();
    }
    // The last stripe is the block's final 64 bytes: the last part's end.
    const long long last_part = num_parts - 1;
    const uint64_t* last = (const uint64_t*)(base + block_offsets[block] + last_part * part_stride + part_bytes - 64);
    accumulate(acc, last, lane, secret64(192 - 64 - 7 + lane * 8));

    uint64_t accs[8];
#pragma unroll
    for (int i = 0; i < 8; i++) accs[i] = __shfl_sync(0xFFFFFFFFu, acc, (threadIdx.x & ~7) + i);
    if (lane == 0 && !surplus) {
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
