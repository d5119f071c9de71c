/* densevm workload guest: a freestanding x86-64 program started by densevm in 64-bit
 * mode at CPL 3. It fills its data pages from a scenario (zero, shared-by-seed and
 * unique pages), rewrites a chosen fraction at a chosen rate, verifies every page
 * against what it last wrote, and reports through a report page plus an MMIO
 * doorbell. Content of page i at version v is derived from (seed, i, v). */
#include "abi.h"

#define PAGE_WORDS 512
#define GOLDEN 0x9e3779b97f4a7c15ULL
#define WRITE_SALT 0x5752495445534554ULL

enum kind { KIND_ZERO, KIND_SHARED, KIND_UNIQUE };

/* Per-vCPU environment: a private copy of this vCPU's config page plus its report
 * page. Every vCPU runs this same program on its own slice of the data pages. */
struct env {
    struct workload_config c;
    volatile struct workload_report *rep;
};

/* gcc may emit calls to these even in freestanding code. */
void *memset(void *d, int c, unsigned long n) {
    unsigned char *p = d;
    while (n--) *p++ = (unsigned char)c;
    return d;
}
void *memcpy(void *d, const void *s, unsigned long n) {
    unsigned char *p = d;
    const unsigned char *q = s;
    while (n--) *p++ = *q++;
    return d;
}

static inline uint64_t rdtsc(void) {
    uint32_t lo, hi;
    __asm__ volatile("lfence; rdtsc; lfence" : "=a"(lo), "=d"(hi)::"memory");
    return ((uint64_t)hi << 32) | lo;
}

static inline uint64_t mix64(uint64_t x) {
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
}

static void doorbell(const struct env *e, uint64_t cmd, uint64_t arg) {
    *(volatile uint64_t *)e->c.doorbell_gpa = cmd | (arg << 8);
}

/* Console output: port I/O is not allowed at CPL 3 on every host (it #GPs under
 * this platform's KVM even with IOPL 3), so lines go out through the doorbell, one
 * exit per line. */
struct line {
    char buf[120];
    int len;
};

static void line_str(struct line *l, const char *s) {
    while (*s && l->len < (int)sizeof(l->buf) - 1) l->buf[l->len++] = *s++;
}

static void line_u64(struct line *l, uint64_t v) {
    char tmp[24];
    int i = 23;
    tmp[i] = 0;
    do {
        tmp[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v && i > 0);
    line_str(l, &tmp[i]);
}

static void line_send(const struct env *e, struct line *l) {
    l->buf[l->len] = 0;
    if (e->c.serial) doorbell(e, DB_PUTS, (uint64_t)l->buf);
    l->len = 0;
}

static enum kind page_kind(const struct env *e, uint64_t i) {
    uint64_t r = mix64(e->c.shared_seed ^ ((e->c.page_base + i) * GOLDEN)) >> 32;
    if (r < e->c.zero_thr) return KIND_ZERO;
    if (r < e->c.zero_thr + e->c.shared_thr) return KIND_SHARED;
    return KIND_UNIQUE;
}

static int in_write_set(const struct env *e, uint64_t i) {
    return (mix64(e->c.seed ^ WRITE_SALT ^ ((e->c.page_base + i) * GOLDEN)) >> 32) < e->c.write_thr;
}

static inline uint64_t *page_ptr(const struct env *e, uint64_t i) {
    return (uint64_t *)(e->c.data_gpa + (i << 12));
}

static inline volatile uint32_t *versions(const struct env *e) {
    return (volatile uint32_t *)e->c.versions_gpa;
}

/* The seed-derived key of page i at version v, or 0 for a zero page. */
static uint64_t page_key(const struct env *e, uint64_t i, uint32_t v) {
    uint64_t seed;
    if (v == 0) {
        enum kind k = page_kind(e, i);
        if (k == KIND_ZERO) return 0;
        seed = k == KIND_SHARED ? e->c.shared_seed : e->c.seed;
    } else {
        seed = e->c.seed;
    }
    return mix64(seed ^ mix64((e->c.page_base + i) * GOLDEN + ((uint64_t)v << 40) + 1)) | 1;
}

/* Writes the content for key into page p; returns the cycles of the first store. */
static uint64_t fill_page(uint64_t *p, uint64_t key) {
    uint64_t x = key;
    uint64_t t0 = rdtsc();
    p[0] = x;
    uint64_t t1 = rdtsc();
    if (key == 0) {
        for (int j = 1; j < PAGE_WORDS; j++) p[j] = 0;
        return t1 - t0;
    }
    for (int j = 1; j < PAGE_WORDS; j++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        p[j] = x;
    }
    return t1 - t0;
}

static int page_matches(const uint64_t *p, uint64_t key) {
    uint64_t x = key;
    if (p[0] != x) return 0;
    if (key == 0) {
        for (int j = 1; j < PAGE_WORDS; j++)
            if (p[j] != 0) return 0;
        return 1;
    }
    for (int j = 1; j < PAGE_WORDS; j++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if (p[j] != x) return 0;
    }
    return 1;
}

static void verify_page(const struct env *e, uint64_t i) {
    if (!page_matches(page_ptr(e, i), page_key(e, i, versions(e)[i]))) {
        e->rep->mismatches = e->rep->mismatches + 1;
        if (e->rep->first_mismatch == 0) e->rep->first_mismatch = e->c.page_base + i + 1;
        doorbell(e, DB_MISMATCH, e->c.page_base + i);
    }
    e->rep->pages_verified = e->rep->pages_verified + 1;
}

static void verify_all(const struct env *e) {
    uint64_t n = e->c.npages;
    for (uint64_t i = 0; i < n; i++) verify_page(e, i);
    e->rep->full_verifies = e->rep->full_verifies + 1;
}

static void rewrite_page(const struct env *e, uint64_t i) {
    uint32_t v = versions(e)[i] + 1;
    if (v == 0) v = 1; /* version 0 means "as filled" */
    uint64_t t0 = rdtsc();
    uint64_t first = fill_page(page_ptr(e, i), page_key(e, i, v));
    uint64_t dt = rdtsc() - t0;
    versions(e)[i] = v;
    e->rep->pages_written = e->rep->pages_written + 1;
    e->rep->write_cycles_sum = e->rep->write_cycles_sum + dt;
    if (dt > e->rep->write_cycles_max) e->rep->write_cycles_max = dt;
    e->rep->write_first_cycles_sum = e->rep->write_first_cycles_sum + first;
    if (first > e->rep->write_first_cycles_max) e->rep->write_first_cycles_max = first;
}

void workload_main(const volatile struct workload_config *cfgp) {
    struct env env;
    struct env *e = &env;
    if (cfgp->magic != CONFIG_MAGIC) __builtin_trap();
    env.c = *(const struct workload_config *)cfgp;
    env.rep = (volatile struct workload_report *)((uint64_t)cfgp + 0x1000);
    uint64_t n = e->c.npages;
    e->rep->magic = REPORT_MAGIC;
    e->rep->npages = n;
    e->rep->start_tsc = rdtsc();
    e->rep->state = STATE_FILLING;
    struct line out = {.len = 0};
    line_str(&out, "workload: filling ");
    line_u64(&out, n);
    line_str(&out, " pages\n");
    line_send(e, &out);

    uint64_t t0 = rdtsc();
    uint64_t nwrite = 0;
    for (uint64_t i = 0; i < n; i++) {
        versions(e)[i] = 0;
        fill_page(page_ptr(e, i), page_key(e, i, 0));
        nwrite += (uint64_t)in_write_set(e, i);
        e->rep->pages_filled = i + 1;
    }
    e->rep->fill_cycles = rdtsc() - t0;
    verify_all(e);
    e->rep->now_tsc = rdtsc();
    e->rep->state = STATE_RUNNING;
    doorbell(e, DB_FILL_DONE, 0);
    line_str(&out, "workload: filled and verified\n");
    line_send(e, &out);

    uint64_t hz = e->c.tsc_khz * 1000;
    uint64_t loop_start = rdtsc();
    uint64_t duration_cycles = e->c.duration_s * hz;
    uint64_t write_cursor = 0, verify_cursor = 0, written = 0;
    for (;;) {
        uint64_t now = rdtsc();
        uint64_t elapsed = now - loop_start;
        if (duration_cycles && elapsed >= duration_cycles) break;
        uint64_t due = 0;
        if (nwrite && e->c.writes_per_s) {
            uint64_t elapsed_us = elapsed * 1000 / e->c.tsc_khz;
            due = elapsed_us * e->c.writes_per_s / 1000000;
        }
        uint64_t batch = 0;
        while (written < due && batch < 4096) {
            while (!in_write_set(e, write_cursor)) write_cursor = (write_cursor + 1) % n;
            rewrite_page(e, write_cursor);
            write_cursor = (write_cursor + 1) % n;
            written++;
            batch++;
        }
        for (uint64_t c = 0; c < e->c.verify_chunk; c++) {
            verify_page(e, verify_cursor);
            if (++verify_cursor == n) {
                verify_cursor = 0;
                e->rep->full_verifies = e->rep->full_verifies + 1;
            }
        }
        e->rep->now_tsc = rdtsc();
        if (written >= due) {
            e->rep->wakeups = e->rep->wakeups + 1;
            doorbell(e, DB_SLEEP_US, e->c.quantum_us);
        }
    }
    verify_all(e);
    e->rep->now_tsc = rdtsc();
    e->rep->state = STATE_DONE;
    line_str(&out, "workload: done, mismatches ");
    line_u64(&out, e->rep->mismatches);
    line_str(&out, "\n");
    line_send(e, &out);
    for (;;) doorbell(e, DB_DONE, 0);
}
