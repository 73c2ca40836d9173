/* The physical limit for bench_read.py: a plain liburing loop, O_DIRECT, fixed
 * queue depth, no planning, no Python. Prints one line of JSON.
 *
 *   liburing_limit seq  PATH QD BS            whole file, sequential BS reads
 *   liburing_limit rand PATH QD BS COUNT SEED COUNT random BS-aligned reads
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <liburing.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static uint64_t rng_state;
static uint64_t next_rand(void) { /* splitmix64 */
  uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

int main(int argc, char** argv) {
  if (argc < 5) {
    fprintf(stderr, "usage: %s seq|rand PATH QD BS [COUNT SEED]\n", argv[0]);
    return 2;
  }
  const int rand_mode = strcmp(argv[1], "rand") == 0;
  const char* path = argv[2];
  const unsigned qd = (unsigned)atoi(argv[3]);
  const size_t bs = (size_t)atoll(argv[4]);
  const uint64_t count_arg = argc > 5 ? strtoull(argv[5], 0, 10) : 0;
  rng_state = argc > 6 ? strtoull(argv[6], 0, 10) : 1;
  int fd = open(path, O_RDONLY | O_DIRECT);
  if (fd < 0) { fprintf(stderr, "open %s: %s\n", path, strerror(errno)); return 1; }
  struct stat st;
  fstat(fd, &st);
  const uint64_t size = (uint64_t)st.st_size, nblocks = size / bs;
  const uint64_t total = rand_mode ? count_arg : (size + bs - 1) / bs;
  struct io_uring ring;
  int rc = io_uring_queue_init(qd, &ring, 0);
  if (rc < 0) { fprintf(stderr, "io_uring_queue_init: %s\n", strerror(-rc)); return 1; }
  char* bufs;
  if (posix_memalign((void**)&bufs, 4096, (size_t)qd * bs)) return 1;
  memset(bufs, 0, (size_t)qd * bs);
  uint64_t submitted = 0, done = 0, bytes = 0;
  unsigned inflight = 0;
  int* free_idx = malloc(sizeof(int) * qd);
  unsigned nfree = qd;
  for (unsigned i = 0; i < qd; ++i) free_idx[i] = (int)i;
  double t0 = now();
  while (done < total) {
    while (submitted < total && nfree > 0) {
      struct io_uring_sqe* sqe = io_uring_get_sqe(&ring);
      if (!sqe) break;
      int b = free_idx[--nfree];
      uint64_t off = rand_mode ? (next_rand() % nblocks) * bs : submitted * bs;
      io_uring_prep_read(sqe, fd, bufs + (size_t)b * bs, (unsigned)bs, off);
      io_uring_sqe_set_data64(sqe, (uint64_t)b);
      ++submitted;
      ++inflight;
    }
    rc = io_uring_submit_and_wait(&ring, 1);
    if (rc < 0 && rc != -EINTR) { fprintf(stderr, "submit: %s\n", strerror(-rc)); return 1; }
    struct io_uring_cqe* cqe;
    unsigned head, seen = 0;
    io_uring_for_each_cqe(&ring, head, cqe) {
      if (cqe->res < 0) { fprintf(stderr, "read: %s\n", strerror(-cqe->res)); return 1; }
      bytes += (uint64_t)cqe->res;
      free_idx[nfree++] = (int)io_uring_cqe_get_data64(cqe);
      ++seen;
      ++done;
      --inflight;
    }
    io_uring_cq_advance(&ring, seen);
  }
  double dt = now() - t0;
  printf("{\"bytes\": %llu, \"ops\": %llu, \"seconds\": %.6f}\n", (unsigned long long)bytes,
         (unsigned long long)done, dt);
  io_uring_queue_exit(&ring);
  return 0;
}
