/* Quantize rows with llama.cpp's own ggml-quants.c: reads float32 rows (and optionally one float32
 * importance per column) and writes the packed bytes of one GGUF type, as llama-quantize would.
 * Usage: quantize_rows TYPE ROWS COLS INPUT IMPORTANCE|- OUTPUT. Built and run by regenerate.py. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "ggml.h"
#include "ggml-quants.h"

/* ggml-quants.c needs these few symbols of ggml.c, whose build needs generated headers. */
void ggml_abort(const char * file, int line, const char * fmt, ...) {
    fprintf(stderr, "ggml_abort at %s:%d (%s)\n", file, line, fmt);
    exit(2);
}

static const struct { const char * name; enum ggml_type type; int block; int bytes; } TYPES[] = {
    {"Q8_0", GGML_TYPE_Q8_0, 32, 34}, {"Q4_0", GGML_TYPE_Q4_0, 32, 18}, {"Q4_1", GGML_TYPE_Q4_1, 32, 20},
    {"Q5_0", GGML_TYPE_Q5_0, 32, 22}, {"Q5_1", GGML_TYPE_Q5_1, 32, 24}, {"Q2_K", GGML_TYPE_Q2_K, 256, 84},
    {"Q3_K", GGML_TYPE_Q3_K, 256, 110}, {"Q4_K", GGML_TYPE_Q4_K, 256, 144}, {"Q5_K", GGML_TYPE_Q5_K, 256, 176},
    {"Q6_K", GGML_TYPE_Q6_K, 256, 210},
};
#define N_TYPES (sizeof(TYPES) / sizeof(TYPES[0]))

static int find(enum ggml_type type) {
    for (size_t i = 0; i < N_TYPES; i++) if (TYPES[i].type == type) return (int) i;
    fprintf(stderr, "unknown type %d\n", (int) type);
    exit(2);
}
size_t ggml_type_size(enum ggml_type type) { return TYPES[find(type)].bytes; }
int64_t ggml_blck_size(enum ggml_type type) { return TYPES[find(type)].block; }
size_t ggml_row_size(enum ggml_type type, int64_t ne) { return ggml_type_size(type) * ne / ggml_blck_size(type); }
const char * ggml_type_name(enum ggml_type type) { return TYPES[find(type)].name; }

static void * read_all(const char * path, size_t n) {
    void * data = malloc(n);
    FILE * f = fopen(path, "rb");
    if (!f || fread(data, 1, n, f) != n) { fprintf(stderr, "cannot read %zu bytes of %s\n", n, path); exit(2); }
    fclose(f);
    return data;
}

int main(int argc, char ** argv) {
    if (argc != 7) { fprintf(stderr, "usage: %s TYPE ROWS COLS INPUT IMPORTANCE|- OUTPUT\n", argv[0]); return 2; }
    int t = -1;
    for (size_t i = 0; i < N_TYPES; i++) if (strcmp(argv[1], TYPES[i].name) == 0) t = (int) i;
    if (t < 0) { fprintf(stderr, "unknown type %s\n", argv[1]); return 2; }
    const int64_t rows = atoll(argv[2]), cols = atoll(argv[3]);
    float * x = read_all(argv[4], sizeof(float) * rows * cols);
    float * importance = strcmp(argv[5], "-") == 0 ? NULL : read_all(argv[5], sizeof(float) * cols);
    const size_t n = ggml_row_size(TYPES[t].type, cols) * rows;
    void * out = malloc(n);
    size_t written;
    switch (TYPES[t].type) {
        case GGML_TYPE_Q8_0: written = quantize_q8_0(x, out, rows, cols, importance); break;
        case GGML_TYPE_Q4_0: written = quantize_q4_0(x, out, rows, cols, importance); break;
        case GGML_TYPE_Q4_1: written = quantize_q4_1(x, out, rows, cols, importance); break;
        case GGML_TYPE_Q5_0: written = quantize_q5_0(x, out, rows, cols, importance); break;
        case GGML_TYPE_Q5_1: written = quantize_q5_1(x, out, rows, cols, importance); break;
        case GGML_TYPE_Q2_K: written = quantize_q2_K(x, out, rows, cols, importance); break;
        case GGML_TYPE_Q3_K: written = quantize_q3_K(x, out, rows, cols, importance); break;
        case GGML_TYPE_Q4_K: written = quantize_q4_K(x, out, rows, cols, importance); break;
        case GGML_TYPE_Q5_K: written = quantize_q5_K(x, out, rows, cols, importance); break;
        default: written = quantize_q6_K(x, out, rows, cols, importance); break;
    }
    if (written != n) { fprintf(stderr, "wrote %zu bytes, expected %zu\n", written, n); return 2; }
    FILE * f = fopen(argv[6], "wb");
    if (!f || fwrite(out, 1, n, f) != n) { fprintf(stderr, "cannot write %s\n", argv[6]); return 2; }
    fclose(f);
    return 0;
}
