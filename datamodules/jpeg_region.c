/* Decode only the region of a JPEG that a crop reads (datamodules/jpeg_region.py builds this
 * file into a shared library on first use; datamodules/ffcv_ops.py calls it from the decode loop).
 *
 * libjpeg-turbo's libjpeg API: jpeg_skip_scanlines() skips the rows above the region (entropy
 * decoded, no IDCT, no colour conversion), jpeg_crop_scanline() limits the IDCT and colour
 * conversion to the iMCU columns that cover the region, and the rows below it are never
 * decoded. Same settings as ffcv 1.0.2's imdecode (tjDecompress2 with TJFLAG_FASTDCT: the
 * IFAST IDCT, fancy upsampling, RGB), so the region's pixels equal the full decode's
 * (tests/test_data.py checks it to the bit).
 */
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>

#include <jpeglib.h>

struct zoo_error {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
};

static void zoo_error_exit(j_common_ptr cinfo) { longjmp(((struct zoo_error *)cinfo->err)->jump, 1); }
static void zoo_no_output(j_common_ptr cinfo) { (void)cinfo; }

/* Rows [r0, r1) and (at least) columns [c0, c1) of the image decoded at scale 1/k (k = 1, 2, 4
 * or 8), RGB, into dst (dst_size bytes), one row after another with a stride of the returned
 * width; *x0 receives the first decoded column (c0 - 1 rounded down to an iMCU boundary).
 * Returns the decoded width, or -1 (corrupt data, a region outside the image, dst too small):
 * the caller then decodes the whole image. Thread-safe: no state outside the call. */
int64_t zoo_jpeg_decode_region(const uint8_t *src, uint64_t size, uint8_t *dst, uint64_t dst_size, int64_t r0,
                               int64_t r1, int64_t c0, int64_t c1, int64_t k, int64_t *x0) {
    struct jpeg_decompress_struct cinfo;
    struct zoo_error err;
    volatile int64_t width = -1;
    cinfo.err = jpeg_std_error(&err.pub);
    err.pub.error_exit = zoo_error_exit;
    err.pub.output_message = zoo_no_output;
    jpeg_create_decompress(&cinfo);
    if (setjmp(err.jump)) {
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    jpeg_mem_src(&cinfo, src, (unsigned long)size);
    jpeg_read_header(&cinfo, TRUE);
    cinfo.out_color_space = JCS_RGB;
    cinfo.dct_method = JDCT_IFAST;
    cinfo.scale_num = 1;
    cinfo.scale_denom = (unsigned int)k;
    jpeg_start_decompress(&cinfo);
    if (cinfo.output_components == 3 && 0 <= r0 && r0 < r1 && r1 <= (int64_t)cinfo.output_height && 0 <= c0 &&
        c0 < c1 && c1 <= (int64_t)cinfo.output_width) {
        /* one more column on each side where there is one: fancy upsampling of subsampled chroma
         * at the edge of a cropped scanline uses replicated samples, not the true neighbours
         * (without it 237 of 900 random regions differed from the full decode, with it none) */
        int64_t left = c0 > 0 ? c0 - 1 : c0, right = c1 < (int64_t)cinfo.output_width ? c1 + 1 : c1;
        JDIMENSION xoff = (JDIMENSION)left, w = (JDIMENSION)(right - left);
        jpeg_crop_scanline(&cinfo, &xoff, &w);
        if ((uint64_t)w * 3 * (uint64_t)(r1 - r0) <= dst_size) {
            if (r0 > 0)
                jpeg_skip_scanlines(&cinfo, (JDIMENSION)r0);
            for (int64_t r = 0; r < r1 - r0; r++) {
                JSAMPROW row = dst + (uint64_t)r * w * 3;
                jpeg_read_scanlines(&cinfo, &row, 1);
            }
            *x0 = xoff;
            width = w;
        }
    }
    jpeg_abort_decompress(&cinfo);
    jpeg_destroy_decompress(&cinfo);
    return width;
}
