// A 4-/8-bit block-quantized GEMM for a few rows at once, as an onnxruntime custom op.
//
// Why: onnxruntime's own MatMulNBits (MLAS, int8 compute) unpacks each 4-bit block once per row of A, so a
// decode step of 8 batched rows costs ~3.7x one row. Here a block of B is unpacked once into a register and
// multiplied against up to 8 rows (AVX-512 VNNI, u8 x s8 -> s32), so shared decode steps get cheaper per row.
//
// Numerics: like MLAS's int8 compute. Each row of A is quantized per block to int8 (scale = max|a| / 127),
// and each row is computed with the same instructions in the same order whatever the other rows are: a row's
// result does not depend on which requests share its step.
//
// The op "RowsMatMulNBits" (domain "accelserve") takes MatMulNBits' inputs A, B, scales, optional zero points
// and its attributes K, N, bits (4 or 8), block_size (16..256, a power of two). Packing happens once, when
// the session creates the kernel, from B's constant initializers.
#include <immintrin.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>
#include <string>
#include <vector>

#include "onnxruntime_c_api.h"

namespace {

const OrtApi* g_api = nullptr;
constexpr int kCols = 16;  // columns per group: one zmm of int32 / float lanes
constexpr int kRows = 8;   // rows per tile

// onnxruntime 1.21's C API reads a tensor's data only through the mutable accessor; these inputs are never written.
OrtStatus* ReadData(const OrtValue* value, const void** data) {
  void* p = nullptr;
  OrtStatus* status = g_api->GetTensorMutableData(const_cast<OrtValue*>(value), &p);
  *data = p;
  return status;
}

OrtStatus* Fail(const std::string& message) { return g_api->CreateStatus(ORT_FAIL, message.c_str()); }

#define RETURN_IF_ERROR(expr)          \
  do {                                 \
    OrtStatus* _status = (expr);       \
    if (_status != nullptr) return _status; \
  } while (0)

struct AlignedBuffer {
  void* ptr = nullptr;
  void reset(size_t bytes) {
    std::free(ptr);
    ptr = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (ptr == nullptr) throw std::bad_alloc();
    std::memset(ptr, 0, (bytes + 63) / 64 * 64);
  }
  ~AlignedBuffer() { std::free(ptr); }
};

struct Kernel {
  int64_t K = 0, N = 0, bits = 0, blk = 0, nblk = 0, ngroups = 0, kpad = 0;
  size_t group_block_bytes = 0;  // packed bytes of one (column group, block)
  AlignedBuffer data;            // [group][block][blk/4 k-quads][16 cols][4 k], nibble pairs when 4-bit
  AlignedBuffer scale;           // [group][block][16]: B's scale
  AlignedBuffer zscale;          // [group][block][16]: B's zero point x scale
};

OrtStatus* ConstantInput(const OrtKernelInfo* info, size_t index, const OrtValue** value, bool required) {
  int is_constant = 0;
  *value = nullptr;
  RETURN_IF_ERROR(g_api->KernelInfoGetConstantInput_tensor(info, index, &is_constant, value));
  if (required && (!is_constant || *value == nullptr))
    return Fail("RowsMatMulNBits: input " + std::to_string(index) + " must be a constant initializer");
  if (!is_constant) *value = nullptr;
  return nullptr;
}

OrtStatus* Pack(Kernel& k, const uint8_t* b, const float* scales, const uint8_t* zp) {
  const int64_t blob = k.blk * k.bits / 8;  // bytes of one column's block in MatMulNBits' layout
  const int64_t zp_row = k.bits == 4 ? (k.nblk + 1) / 2 : k.nblk;
  const int default_zp = 1 << (k.bits - 1);
  k.group_block_bytes = static_cast<size_t>(k.blk) * kCols * k.bits / 8;
  k.data.reset(static_cast<size_t>(k.ngroups * k.nblk) * k.group_block_bytes);
  k.scale.reset(sizeof(float) * k.ngroups * k.nblk * kCols);
  k.zscale.reset(sizeof(float) * k.ngroups * k.nblk * kCols);
  auto* out = static_cast<uint8_t*>(k.data.ptr);
  auto* sc = static_cast<float*>(k.scale.ptr);
  auto* zs = static_cast<float*>(k.zscale.ptr);
  for (int64_t g = 0; g < k.ngroups; ++g) {
    for (int64_t blk = 0; blk < k.nblk; ++blk) {
      uint8_t* dst = out + (g * k.nblk + blk) * k.group_block_bytes;
      float* s = sc + (g * k.nblk + blk) * kCols;
      float* z = zs + (g * k.nblk + blk) * kCols;
      for (int j = 0; j < kCols; ++j) {
        const int64_t n = g * kCols + j;
        if (n >= k.N) continue;  // padded columns keep zero scale: they contribute nothing
        const uint8_t* src = b + (n * k.nblk + blk) * blob;
        auto value = [&](int64_t kk) -> uint8_t {
          if (k.bits == 8) return src[kk];
          return (kk & 1) ? (src[kk / 2] >> 4) : (src[kk / 2] & 0x0F);
        };
        int zero = default_zp;
        if (zp != nullptr) {
          zero = k.bits == 8 ? zp[n * zp_row + blk] : ((blk & 1) ? zp[n * zp_row + blk / 2] >> 4 : zp[n * zp_row + blk / 2] & 0x0F);
        }
        s[j] = scales[n * k.nblk + blk];
        z[j] = static_cast<float>(zero) * s[j];
        if (k.bits == 8) {  // one 64-byte vector per quad of k: byte j*4+t = B[k=4q+t, col j]
          for (int64_t q = 0; q < k.blk / 4; ++q)
            for (int t = 0; t < 4; ++t) dst[q * 64 + j * 4 + t] = value(q * 4 + t);
        } else {  // one 64-byte vector per two quads: low nibble quad 2p, high nibble quad 2p+1
          for (int64_t p = 0; p < k.blk / 8; ++p)
            for (int t = 0; t < 4; ++t)
              dst[p * 64 + j * 4 + t] = static_cast<uint8_t>(value(p * 8 + t) | (value(p * 8 + 4 + t) << 4));
        }
      }
    }
  }
  return nullptr;
}

// Hint the kernel to reclaim the pages of a weight we have packed. onnxruntime memory-maps external weights
// and keeps them mapped; its own MatMulNBits releases each original after pre-packing, but a custom op cannot,
// so without this every original and every packed copy would be resident together at the end of the load
// (~75 MB more peak on the default model). MADV_PAGEOUT never changes contents: a file page comes back from
// the file if read again, an anonymous page without swap simply stays.
void GiveBack(const void* data, size_t bytes) {
#ifdef MADV_PAGEOUT
  static const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t start = reinterpret_cast<uintptr_t>(data) & ~(page - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes + page - 1) & ~(page - 1);
  madvise(reinterpret_cast<void*>(start), end - start, MADV_PAGEOUT);  // a hint: failure changes nothing
#else
  (void)data;
  (void)bytes;
#endif
}

// A row quantized per block: int8 values, the block's scale, and scale x sum of the int8 values. Vectorized
// (16 floats a step, the tail masked to zero); _mm512_cvtps_epi32 rounds half to even like nearbyint.
void QuantizeRow(const float* a, int64_t K, int64_t blk, int64_t nblk, int8_t* q, float* scale, float* scaled_sum) {
  const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
  for (int64_t b = 0; b < nblk; ++b) {
    const int64_t start = b * blk;
    __m512 vmax = _mm512_setzero_ps();
    for (int64_t i = start; i < start + blk; i += 16) {
      const int64_t left = K - i;
      const __mmask16 m = left >= 16 ? 0xFFFF : (left > 0 ? static_cast<__mmask16>((1u << left) - 1) : 0);
      vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_maskz_loadu_ps(m, a + i)));
    }
    const float amax = _mm512_reduce_max_ps(vmax);
    const float s = amax / 127.f;
    const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    __m512i vsum = _mm512_setzero_si512();
    for (int64_t i = start; i < start + blk; i += 16) {
      const int64_t left = K - i;
      const __mmask16 m = left >= 16 ? 0xFFFF : (left > 0 ? static_cast<__mmask16>((1u << left) - 1) : 0);
      __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, a + i), inv));
      v = _mm512_min_epi32(_mm512_max_epi32(v, lo), hi);
      vsum = _mm512_add_epi32(vsum, v);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), _mm512_cvtepi32_epi8(v));
    }
    scale[b] = s;
    scaled_sum[b] = s * static_cast<float>(_mm512_reduce_add_epi32(vsum));
  }
}

// acc += u8 x s8 dot products of 4 (VNNI). Inline assembly keeps each accumulator in one register: written
// with the intrinsic, GCC 12 copies every accumulator to another register and back around each instruction.
inline __m512i Dot(__m512i acc, __m512i u8, __m512i s8) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "v"(s8));
  return acc;
}

// The same with the 4 activation bytes broadcast from memory inside the instruction ({1to16}): no separate
// broadcast instruction per row.
inline __m512i DotBroadcast(__m512i acc, __m512i u8, const int8_t* s8x4) {
  asm("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(u8), "m"(*reinterpret_cast<const int32_t*>(s8x4)));
  return acc;
}

// R rows x C column groups: R*C independent accumulator chains keep the VNNI unit busy even for one row.
template <int R, int C, int BITS, int BLK>
void Tile(const Kernel& k, const int8_t* qa, const float* ascale, const float* asum, int64_t g, float* y) {
  const int64_t blk = BLK ? BLK : k.blk;  // a compile-time block (32, the usual) unrolls the inner loops
  __m512 out[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) out[r][c] = _mm512_setzero_ps();
  const auto* base = static_cast<const uint8_t*>(k.data.ptr);
  const size_t group_bytes = k.nblk * k.group_block_bytes;
  const float* sc = static_cast<const float*>(k.scale.ptr) + g * k.nblk * kCols;
  const float* zs = static_cast<const float*>(k.zscale.ptr) + g * k.nblk * kCols;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  for (int64_t b = 0; b < k.nblk; ++b) {
    __m512i acc[R][C];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_si512();
    const int8_t* ab = qa + b * blk;
    const uint8_t* bp = base + g * group_bytes + b * k.group_block_bytes;
    if (BITS == 4) {
      for (int64_t p = 0; p < blk / 8; ++p) {
        __m512i lo[C], hi[C];
        for (int c = 0; c < C; ++c) {
          const __m512i v = _mm512_load_si512(bp + c * group_bytes + p * 64);
          lo[c] = _mm512_and_si512(v, low4);
          hi[c] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
        }
        for (int r = 0; r < R; ++r) {
          const int8_t* ar = ab + r * k.kpad + p * 8;
          if (C == 1) {
            acc[r][0] = DotBroadcast(acc[r][0], lo[0], ar);
            acc[r][0] = DotBroadcast(acc[r][0], hi[0], ar + 4);
            continue;
          }
          int32_t a0, a1;
          std::memcpy(&a0, ar, 4);
          std::memcpy(&a1, ar + 4, 4);
          const __m512i b0 = _mm512_set1_epi32(a0), b1 = _mm512_set1_epi32(a1);
          for (int c = 0; c < C; ++c) {
            acc[r][c] = Dot(acc[r][c], lo[c], b0);
            acc[r][c] = Dot(acc[r][c], hi[c], b1);
          }
        }
      }
    } else {
      for (int64_t q = 0; q < blk / 4; ++q) {
        __m512i v[C];
        for (int c = 0; c < C; ++c) v[c] = _mm512_load_si512(bp + c * group_bytes + q * 64);
        for (int r = 0; r < R; ++r) {
          const int8_t* ar = ab + r * k.kpad + q * 4;
          if (C == 1) {
            acc[r][0] = DotBroadcast(acc[r][0], v[0], ar);
            continue;
          }
          int32_t a0;
          std::memcpy(&a0, ar, 4);
          const __m512i b0 = _mm512_set1_epi32(a0);
          for (int c = 0; c < C; ++c) acc[r][c] = Dot(acc[r][c], v[c], b0);
        }
      }
    }
    for (int c = 0; c < C; ++c) {
      const __m512 s = _mm512_load_ps(sc + (c * k.nblk + b) * kCols);
      const __m512 z = _mm512_load_ps(zs + (c * k.nblk + b) * kCols);
      for (int r = 0; r < R; ++r) {
        const __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(acc[r][c]), s);
        out[r][c] = _mm512_fmadd_ps(f, _mm512_set1_ps(ascale[r * k.nblk + b]), out[r][c]);
        out[r][c] = _mm512_fnmadd_ps(z, _mm512_set1_ps(asum[r * k.nblk + b]), out[r][c]);
      }
    }
  }
  for (int c = 0; c < C; ++c) {
    const int64_t n0 = (g + c) * kCols;
    const __mmask16 mask = static_cast<__mmask16>(k.N - n0 >= kCols ? 0xFFFF : ((1u << (k.N - n0)) - 1));
    for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(y + r * k.N + n0, mask, out[r][c]);
  }
}

// Column groups [g0, g1) for `rows` rows: wide tiles (several groups) when few rows, tall ones when many.
template <int BITS, int BLK>
void RunTiles(int rows, const Kernel& k, const int8_t* qa, const float* as, const float* az, int64_t g0, int64_t g1, float* y) {
  int64_t g = g0;
#define ROWS_TILES(R, C)                                                    \
  for (; g + (C) <= g1; g += (C)) Tile<R, C, BITS, BLK>(k, qa, as, az, g, y); \
  for (; g < g1; ++g) Tile<R, 1, BITS, BLK>(k, qa, as, az, g, y);             \
  return;
  switch (rows) {
    case 1: ROWS_TILES(1, 4)
    case 2: ROWS_TILES(2, 4)
    case 3: ROWS_TILES(3, 2)
    case 4: ROWS_TILES(4, 2)
    case 5: ROWS_TILES(5, 1)
    case 6: ROWS_TILES(6, 1)
    case 7: ROWS_TILES(7, 1)
    default: ROWS_TILES(8, 1)
  }
#undef ROWS_TILES
}

struct Call {
  const Kernel* k;
  int64_t M, tiles, chunks, groups_per_chunk;
  const int8_t* qa;
  const float* ascale;
  const float* asum;
  float* y;
};

// One unit: a chunk of column groups for every row tile. Groups outer, tiles inner, four groups at a time:
// those groups' B (a few KB) stays in L1 while a long prompt's tiles of 8 rows pass over it.
void RunUnit(void* user, size_t unit) {
  const Call& c = *static_cast<const Call*>(user);
  const int64_t g0 = static_cast<int64_t>(unit) * c.groups_per_chunk;
  const int64_t g1 = std::min(c.k->ngroups, g0 + c.groups_per_chunk);
  const bool blk32 = c.k->blk == 32;
  for (int64_t g = g0; g < g1; g += 4) {
    const int64_t gend = std::min(g1, g + 4);
    for (int64_t tile = 0; tile < c.tiles; ++tile) {
      const int64_t m0 = tile * kRows;
      const int rows = static_cast<int>(std::min<int64_t>(kRows, c.M - m0));
      const int8_t* qa = c.qa + m0 * c.k->kpad;
      const float* as = c.ascale + m0 * c.k->nblk;
      const float* az = c.asum + m0 * c.k->nblk;
      float* y = c.y + m0 * c.k->N;
      if (c.k->bits == 4)
        blk32 ? RunTiles<4, 32>(rows, *c.k, qa, as, az, g, gend, y) : RunTiles<4, 0>(rows, *c.k, qa, as, az, g, gend, y);
      else
        blk32 ? RunTiles<8, 32>(rows, *c.k, qa, as, az, g, gend, y) : RunTiles<8, 0>(rows, *c.k, qa, as, az, g, gend, y);
    }
  }
}

OrtStatus* ORT_API_CALL CreateKernel(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo* info, void** out) {
  auto* k = new (std::nothrow) Kernel();
  if (k == nullptr) return Fail("RowsMatMulNBits: out of memory");
  auto attr = [&](const char* name, int64_t* value) { return g_api->KernelInfoGetAttribute_int64(info, name, value); };
  OrtStatus* status = nullptr;
  if ((status = attr("K", &k->K)) || (status = attr("N", &k->N)) || (status = attr("bits", &k->bits)) ||
      (status = attr("block_size", &k->blk))) {
    delete k;
    return status;
  }
  if ((k->bits != 4 && k->bits != 8) || k->blk < 16 || k->blk > 256 || (k->blk & (k->blk - 1))) {
    delete k;
    return Fail("RowsMatMulNBits: needs bits 4 or 8 and a power-of-two block_size in [16, 256]");
  }
  k->nblk = (k->K + k->blk - 1) / k->blk;
  k->kpad = k->nblk * k->blk;
  k->ngroups = (k->N + kCols - 1) / kCols;
  const OrtValue *b = nullptr, *scales = nullptr, *zp = nullptr;
  size_t inputs = 0;
  status = g_api->KernelInfo_GetInputCount(info, &inputs);
  if (!status) status = ConstantInput(info, 1, &b, true);
  if (!status) status = ConstantInput(info, 2, &scales, true);
  if (!status && inputs > 3) status = ConstantInput(info, 3, &zp, false);
  if (!status && inputs > 3 && zp == nullptr) status = Fail("RowsMatMulNBits: zero points must be a constant initializer");
  const void *bd = nullptr, *sd = nullptr, *zd = nullptr;
  if (!status) status = ReadData(b, &bd);
  if (!status) status = ReadData(scales, &sd);
  if (!status && zp) status = ReadData(zp, &zd);
  if (!status) {
    try {
      status = Pack(*k, static_cast<const uint8_t*>(bd), static_cast<const float*>(sd), static_cast<const uint8_t*>(zd));
      if (status == nullptr) {
        GiveBack(bd, static_cast<size_t>(k->N * k->nblk * k->blk * k->bits / 8));
        GiveBack(sd, static_cast<size_t>(k->N * k->nblk) * sizeof(float));
        if (zd) GiveBack(zd, static_cast<size_t>(k->N * (k->bits == 4 ? (k->nblk + 1) / 2 : k->nblk)));
      }
    } catch (const std::bad_alloc&) {
      status = Fail("RowsMatMulNBits: out of memory packing B");
    }
  }
  if (status) {
    delete k;
    return status;
  }
  *out = k;
  return nullptr;
}

OrtStatus* ORT_API_CALL Compute(void* kernel, OrtKernelContext* context) {
  const Kernel& k = *static_cast<Kernel*>(kernel);
  const OrtValue* a = nullptr;
  RETURN_IF_ERROR(g_api->KernelContext_GetInput(context, 0, &a));
  OrtTensorTypeAndShapeInfo* info = nullptr;
  RETURN_IF_ERROR(g_api->GetTensorTypeAndShape(a, &info));
  size_t rank = 0;
  OrtStatus* status = g_api->GetDimensionsCount(info, &rank);
  std::vector<int64_t> shape(rank);
  if (!status) status = g_api->GetDimensions(info, shape.data(), rank);
  g_api->ReleaseTensorTypeAndShapeInfo(info);
  if (status) return status;
  if (rank < 1 || shape.back() != k.K) return Fail("RowsMatMulNBits: A's last dimension must be K");
  int64_t M = 1;
  for (size_t i = 0; i + 1 < rank; ++i) M *= shape[i];
  shape.back() = k.N;
  OrtValue* yv = nullptr;
  RETURN_IF_ERROR(g_api->KernelContext_GetOutput(context, 0, shape.data(), shape.size(), &yv));
  const void* ad = nullptr;
  void* yd = nullptr;
  RETURN_IF_ERROR(ReadData(a, &ad));
  RETURN_IF_ERROR(g_api->GetTensorMutableData(yv, &yd));
  if (M == 0) return nullptr;

  std::vector<int8_t> qa(static_cast<size_t>(M * k.kpad) + 64);
  std::vector<float> ascale(static_cast<size_t>(M * k.nblk)), asum(static_cast<size_t>(M * k.nblk));
  const auto* af = static_cast<const float*>(ad);
  for (int64_t m = 0; m < M; ++m)
    QuantizeRow(af + m * k.K, k.K, k.blk, k.nblk, qa.data() + m * k.kpad, ascale.data() + m * k.nblk,
                asum.data() + m * k.nblk);

  Call c{&k, M, (M + kRows - 1) / kRows, 0, 0, qa.data(), ascale.data(), asum.data(), static_cast<float*>(yd)};
  // About 32 units: enough for the pool to balance, few enough to keep each unit's B streaming.
  c.groups_per_chunk = std::max<int64_t>(4, (k.ngroups / 32 + 3) / 4 * 4);
  c.chunks = (k.ngroups + c.groups_per_chunk - 1) / c.groups_per_chunk;
  return g_api->KernelContext_ParallelFor(context, RunUnit, static_cast<size_t>(c.chunks), 0, &c);
}

void ORT_API_CALL Destroy(void* kernel) { delete static_cast<Kernel*>(kernel); }

const char* ORT_API_CALL Name(const OrtCustomOp*) { return "RowsMatMulNBits"; }
const char* ORT_API_CALL Provider(const OrtCustomOp*) { return "CPUExecutionProvider"; }
ONNXTensorElementDataType ORT_API_CALL InputType(const OrtCustomOp*, size_t index) {
  return index == 0 || index == 2 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
}
size_t ORT_API_CALL InputCount(const OrtCustomOp*) { return 4; }
ONNXTensorElementDataType ORT_API_CALL OutputType(const OrtCustomOp*, size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
size_t ORT_API_CALL OutputCount(const OrtCustomOp*) { return 1; }
OrtCustomOpInputOutputCharacteristic ORT_API_CALL InputCharacteristic(const OrtCustomOp*, size_t index) {
  return index == 3 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
}
OrtCustomOpInputOutputCharacteristic ORT_API_CALL OutputCharacteristic(const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; }
OrtMemType ORT_API_CALL InputMemoryType(const OrtCustomOp*, size_t) { return OrtMemTypeDefault; }
int ORT_API_CALL VariadicArity(const OrtCustomOp*) { return 1; }
int ORT_API_CALL VariadicHomogeneity(const OrtCustomOp*) { return 1; }
int ORT_API_CALL StartVersion(const OrtCustomOp*) { return 1; }
int ORT_API_CALL EndVersion(const OrtCustomOp*) { return INT_MAX; }
size_t ORT_API_CALL NoPairs(int** in, int** out) {
  *in = nullptr;
  *out = nullptr;
  return 0;
}
void ORT_API_CALL ReleasePairs(int*, int*) {}

OrtCustomOp MakeOp() {
  OrtCustomOp op;
  std::memset(&op, 0, sizeof(op));
  op.version = ORT_API_VERSION;
  op.GetName = Name;
  op.GetExecutionProviderType = Provider;
  op.GetInputType = InputType;
  op.GetInputTypeCount = InputCount;
  op.GetOutputType = OutputType;
  op.GetOutputTypeCount = OutputCount;
  op.KernelDestroy = Destroy;
  op.GetInputCharacteristic = InputCharacteristic;
  op.GetOutputCharacteristic = OutputCharacteristic;
  op.GetInputMemoryType = InputMemoryType;
  op.GetVariadicInputMinArity = VariadicArity;
  op.GetVariadicInputHomogeneity = VariadicHomogeneity;
  op.GetVariadicOutputMinArity = VariadicArity;
  op.GetVariadicOutputHomogeneity = VariadicHomogeneity;
  op.CreateKernelV2 = CreateKernel;
  op.KernelComputeV2 = Compute;
  op.GetStartVersion = StartVersion;
  op.GetEndVersion = EndVersion;
  op.GetMayInplace = NoPairs;
  op.ReleaseMayInplace = ReleasePairs;
  op.GetAliasMap = NoPairs;
  op.ReleaseAliasMap = ReleasePairs;
  return op;
}

OrtCustomOp g_op = MakeOp();

}  // namespace

extern "C" ORT_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* base) {
  g_api = base->GetApi(ORT_API_VERSION);
  if (g_api == nullptr) return nullptr;  // cannot even report: this onnxruntime predates the header's API
  OrtCustomOpDomain* domain = nullptr;
  RETURN_IF_ERROR(g_api->CreateCustomOpDomain("accelserve", &domain));
  RETURN_IF_ERROR(g_api->CustomOpDomain_Add(domain, &g_op));
  return g_api->AddCustomOpDomain(options, domain);
}
