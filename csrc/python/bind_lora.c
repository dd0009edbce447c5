/* bind_lora.c: tltorch._C's lora kernels. */
#include "bridge.h" /* first: it brings Python.h */

PyMethodDef tl_lora_methods[] = {
    {NULL, NULL, 0, NULL},
};
