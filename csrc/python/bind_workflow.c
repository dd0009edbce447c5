/* bind_workflow.c: tltorch._C's workflow kernels. */
#include "bridge.h" /* first: it brings Python.h */

PyMethodDef tl_workflow_methods[] = {
    {NULL, NULL, 0, NULL},
};
