// Stored blocks into a paged KV cache, layer by layer, by the GPU's own loads.
//
// The source is either the store's host pool, page-locked and mapped into the
// device's address space (cudaHostRegister), so each load here is a PCIe read
// issued by a multiprocessor; or device memory (the store's HBM pool, mapped by
// CUDA IPC). A stored block is [layers, 2, tokens, heads, dim] back to back; the
// cache is [layers, 2, pages, tokens, heads, dim]. So each (layer, K|V, block)
// is one run of part_bytes, contiguous on both sides: from
//   src + src_offsets[b] + part * part_bytes
// to
//   dst + (part * num_pages + pages[b]) * part_bytes,       part = 2 * layer + kv.
//
// Why not the copy engines: one cudaMemcpy2DAsync per layer and K|V (rows of
// part_bytes, 16 KiB for a 1b model's block of 16 tokens, pitched a whole
// block apart in the pool) moved about 37 GB/s out of a ~55 GB/s link, and a
// scattered pool (a run per block) costs 2 x layers x blocks copy calls. The
// loads here do not care whether the blocks are back to back: one launch per
// layer, whatever the pool's layout.
//
// A CTA copies whole parts, 16 bytes a thread per load, UNROLL loads in flight
// a thread before its first store: a PCIe read takes a microsecond or more, and
// a link of ~55 GB/s needs on the order of 100 KB outstanding to stay busy. The
// grid is small (its size is the caller's choice) and strides over the work,
// so the copy leaves most multiprocessors to the forward pass beside it.
//
// part_bytes must be a multiple of 16 and every address 16-byte aligned (the
// loader checks; it falls back to the copy engines otherwise).

typedef unsigned long long uint64_t;

#define UNROLL 4

extern "C" __global__ void gather_parts(unsigned char* dst, const unsigned char* src,
                                        const long long* src_offsets, const long long* pages, int num_blocks,
                                        int part_begin, int part_end, long long num_pages, long long part_bytes) {
    const long long vecs = part_bytes >> 4;  // uint4 per part
    const long long units = (long long)(part_end - part_begin) * num_blocks;
    for (long long unit = blockIdx.x; unit < units; unit += gridDim.x) {
        const int part = part_begin + (int)(unit / num_blocks);
        const int b = (int)(unit % num_blocks);
        const uint4* from = (const uint4*)(src + src_offsets[b] + (long long)part * part_bytes);
        uint4* to = (uint4*)(dst + ((long long)part * num_pages + pages[b]) * part_bytes);
        long long v = threadIdx.x;
        for (; v + (UNROLL - 1) * (long long)blockDim.x < vecs; v += UNROLL * (long long)blockDim.x) {
            uint4 r[UNROLL];
#pragma unroll
            for (int u = 0; u < UNROLL; u++) r[u] = from[v + u * blockDim.x];
#pragma unroll
            for (int u = 0; u < UNROLL; u++) to[v + u * blockDim.x] = r[u];
        }
        for (; v < vecs; v += blockDim.x) to[v] = from[v];
    }
}
