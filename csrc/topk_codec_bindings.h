// Python bindings of the store's top-k coder (topk_codec.h): numpy arrays in, numpy/bytes out.
#pragma once

#include <pybind11/pybind11.h>

namespace kdengine {

// Adds TopKCoder and TopKCodecError to the extension module.
void bind_topk_codec(pybind11::module_& m);

}  // namespace kdengine
