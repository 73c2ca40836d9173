/* The physical limit for bench_write.py: a plain liburing write loop, O_DIRECT,
 * fixed queue depth, one aligned source buffer registered as a fixed buffer,
 * no copies, no Python; the file is created (truncated) first and fdatasync'ed
 * at the end, both inside the timing. Prints one line of JSON.
 *
 *   liburing_write_limit PATH SIZE QD BS     SIZE bytes (a multiple of 4096) in BS writes
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <liburing.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

int main(int argc, char** argv) {
  if (argc < 5) {
    fprintf(stderr, "usage: %s PATH SIZE QD BS\n", argv[0]);
    return 2;
  }
  const char* path = argv[1];
  const uint64_t size = strtoull(argv[2], 0, 10);
  const unsigned qd = (unsigned)atoi(argv[3]);
  const size_t bs = (size_t)atoll(argv[4]);
  if (size % 4096 || bs % 4096 || qd == 0) { fprintf(stderr, "SIZE and BS must be multiples of 4096\n"); return 2; }
  char* buf;
  if (posix_memalign((void**)&buf, 4096, (size_t)qd * bs)) return 1;
  for (size_t i = 0; i < (size_t)qd * bs; ++i) buf[i] = (char)(i * 131 + 7);
  struct io_uring ring;
  int rc = io_uring_queue_init(qd, &ring, 0);
  if (rc < 0) { fprintf(stderr, "io_uring_queue_init: %s\n", strerror(-rc)); return 1; }
  struct iovec iov = {buf, (size_t)qd * bs};
  const int fixed = io_uring_register_buffers(&ring, &iov, 1) == 0;
  double t0 = now();
  int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_DIRECT, 0644);
  if (fd < 0) { fprintf(stderr, "open %s: %s\n", path, strerror(errno)); return 1; }
  const uint64_t total = (size + bs - 1) / bs;
  uint64_t submitted = 0, done = 0, bytes = 0;
  int* free_idx = malloc(sizeof(int) * qd);
  unsigned nfree = qd;
  for (unsigned i = 0; i < qd; ++i) free_idx[i] = (int)i;
  while (done < total) {
    while (submitted < total && nfree > 0) {
      struct io_uring_sqe* sqe = io_uring_get_sqe(&ring);
      if (!sqe) break;
      int b = free_idx[--nfree];
      const uint64_t off = submitted * bs;
      const unsigned len = (unsigned)(size - off < bs ? size - off : bs);
      if (fixed) io_uring_prep_write_fixed(sqe, fd, buf + (size_t)b * bs, len, off, 0);
      else io_uring_prep_write(sqe, fd, buf + (size_t)b * bs, len, off);
      io_uring_sqe_set_data64(sqe, (uint64_t)b);
      ++submitted;
    }
    rc = io_uring_submit_and_wait(&ring, 1);
    if (rc < 0 && rc != -EINTR) { fprintf(stderr, "submit: %s\n", strerror(-rc)); return 1; }
    struct io_uring_cqe* cqe;
    unsigned head, seen = 0;
    io_uring_for_each_cqe(&ring, head, cqe) {
      /* a short write is not resumed here: the limit assumes the happy path */
      if (cqe->res < 0) { fprintf(stderr, "write: %s\n", strerror(-cqe->res)); return 1; }
      bytes += (uint64_t)cqe->res;
      free_idx[nfree++] = (int)io_uring_cqe_get_data64(cqe);
      ++seen;
      ++done;
    }
    io_uring_cq_advance(&ring, seen);
  }
  if (fdatasync(fd) != 0) { fprintf(stderr, "fdatasync: %s\n", strerror(errno)); return 1; }
  close(fd);
  double dt = now() - t0;
  printf("{\"bytes\": %llu, \"ops\": %llu, \"seconds\": %.6f, \"fixed\": %d}\n", (unsigned long long)bytes,
         (unsigned long long)done, dt, fixed);
  io_uring_queue_exit(&ring);
  return 0;
}
