/* Vector-register and heap canary for the xenlab's dom0: does user state survive context
 * switches under Xen PV on QEMU TCG?  ymm mode: load ymm0-15 with a pattern unique to this
 * process and round, yield + spin (so we are switched out), store, compare.  heap mode:
 * malloc/memset/memcpy/memcmp/free rounds through glibc's (AVX2) string functions. */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static void fill(uint8_t *p, size_t n, uint64_t seed) {
  for (size_t i = 0; i < n; i += 8) { seed = seed * 6364136223846793005ULL + 1442695040888963407ULL; memcpy(p + i, &seed, 8); }
}

#ifdef __AVX2__
static long ymm_round(uint64_t seed) {
  static uint8_t in[16 * 32] __attribute__((aligned(32))), out[16 * 32] __attribute__((aligned(32)));
  fill(in, sizeof in, seed);
  memset(out, 0, sizeof out);
  __asm__ volatile(
      "vmovdqa 0(%0), %%ymm0\n vmovdqa 32(%0), %%ymm1\n vmovdqa 64(%0), %%ymm2\n vmovdqa 96(%0), %%ymm3\n"
      "vmovdqa 128(%0), %%ymm4\n vmovdqa 160(%0), %%ymm5\n vmovdqa 192(%0), %%ymm6\n vmovdqa 224(%0), %%ymm7\n"
      "vmovdqa 256(%0), %%ymm8\n vmovdqa 288(%0), %%ymm9\n vmovdqa 320(%0), %%ymm10\n vmovdqa 352(%0), %%ymm11\n"
      "vmovdqa 384(%0), %%ymm12\n vmovdqa 416(%0), %%ymm13\n vmovdqa 448(%0), %%ymm14\n vmovdqa 480(%0), %%ymm15\n"
      "mov $24, %%eax\n syscall\n"           /* sched_yield */
      "mov $200000, %%rdx\n 1: dec %%rdx\n jnz 1b\n"
      "vmovdqa %%ymm0, 0(%1)\n vmovdqa %%ymm1, 32(%1)\n vmovdqa %%ymm2, 64(%1)\n vmovdqa %%ymm3, 96(%1)\n"
      "vmovdqa %%ymm4, 128(%1)\n vmovdqa %%ymm5, 160(%1)\n vmovdqa %%ymm6, 192(%1)\n vmovdqa %%ymm7, 224(%1)\n"
      "vmovdqa %%ymm8, 256(%1)\n vmovdqa %%ymm9, 288(%1)\n vmovdqa %%ymm10, 320(%1)\n vmovdqa %%ymm11, 352(%1)\n"
      "vmovdqa %%ymm12, 384(%1)\n vmovdqa %%ymm13, 416(%1)\n vmovdqa %%ymm14, 448(%1)\n vmovdqa %%ymm15, 480(%1)\n"
      "vzeroupper\n"
      : : "r"(in), "r"(out)
      : "rax", "rcx", "rdx", "r11", "memory", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7",
        "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15");
  long bad = 0;
  for (int r = 0; r < 16; r++) {
    int lo = memcmp(in + r * 32, out + r * 32, 16) != 0, hi = memcmp(in + r * 32 + 16, out + r * 32 + 16, 16) != 0;
    if (lo || hi) { bad++; if (bad < 4) fprintf(stderr, "CANARY[%d]: ymm%d %s half changed\n", getpid(), r, lo && hi ? "both" : lo ? "low" : "high"); }
  }
  return bad;
}
#endif

static long xmm_round(uint64_t seed) {
  static uint8_t in[16 * 16] __attribute__((aligned(16))), out[16 * 16] __attribute__((aligned(16)));
  fill(in, sizeof in, seed);
  memset(out, 0, sizeof out);
  __asm__ volatile(
      "movdqa 0(%0), %%xmm0\n movdqa 16(%0), %%xmm1\n movdqa 32(%0), %%xmm2\n movdqa 48(%0), %%xmm3\n"
      "movdqa 64(%0), %%xmm4\n movdqa 80(%0), %%xmm5\n movdqa 96(%0), %%xmm6\n movdqa 112(%0), %%xmm7\n"
      "movdqa 128(%0), %%xmm8\n movdqa 144(%0), %%xmm9\n movdqa 160(%0), %%xmm10\n movdqa 176(%0), %%xmm11\n"
      "movdqa 192(%0), %%xmm12\n movdqa 208(%0), %%xmm13\n movdqa 224(%0), %%xmm14\n movdqa 240(%0), %%xmm15\n"
      "mov $24, %%eax\n syscall\n"
      "mov $200000, %%rdx\n 1: dec %%rdx\n jnz 1b\n"
      "movdqa %%xmm0, 0(%1)\n movdqa %%xmm1, 16(%1)\n movdqa %%xmm2, 32(%1)\n movdqa %%xmm3, 48(%1)\n"
      "movdqa %%xmm4, 64(%1)\n movdqa %%xmm5, 80(%1)\n movdqa %%xmm6, 96(%1)\n movdqa %%xmm7, 112(%1)\n"
      "movdqa %%xmm8, 128(%1)\n movdqa %%xmm9, 144(%1)\n movdqa %%xmm10, 160(%1)\n movdqa %%xmm11, 176(%1)\n"
      "movdqa %%xmm12, 192(%1)\n movdqa %%xmm13, 208(%1)\n movdqa %%xmm14, 224(%1)\n movdqa %%xmm15, 240(%1)\n"
      : : "r"(in), "r"(out)
      : "rax", "rcx", "rdx", "r11", "memory", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7",
        "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15");
  long bad = 0;
  for (int r = 0; r < 16; r++)
    if (memcmp(in + r * 16, out + r * 16, 16) != 0) { bad++; if (bad < 4) fprintf(stderr, "CANARY[%d]: xmm%d changed\n", getpid(), r); }
  return bad;
}

static long heap_round(uint64_t seed) {
  long bad = 0;
  size_t n = 64 + (seed % 200000);
  uint8_t *a = malloc(n), *b = malloc(n);
  if (!a || !b) return 1;
  memset(a, (int)(seed & 0xff), n);
  memcpy(b, a, n);
  for (size_t i = 0; i < n; i += 4093) if (b[i] != (uint8_t)(seed & 0xff)) bad++;
  if (memcmp(a, b, n) != 0) bad++;
  if (strlen((char *)memset(a + n - 32, 'x', 31) - 0) < 31) bad++;
  free(a); free(b);
  return bad;
}

int main(int argc, char **argv) {
  if (argc < 3) { fprintf(stderr, "usage: canary ymm|heap SECONDS\n"); return 2; }
  int mode = strcmp(argv[1], "ymm") == 0 ? 2 : strcmp(argv[1], "xmm") == 0 ? 1 : 0;
  time_t end = time(NULL) + atoi(argv[2]);
  long rounds = 0, bad = 0;
  uint64_t seed = (uint64_t)getpid() << 32;
  while (time(NULL) < end) { 
#ifdef __AVX2__
    if (mode == 2) { bad += ymm_round(seed++); rounds++; continue; }
#endif
    bad += mode == 1 ? xmm_round(seed++) : heap_round(seed++); rounds++; }
  printf("CANARY %s pid %d: %ld rounds, %ld bad\n", argv[1], getpid(), rounds, bad);
  return bad != 0;
}
