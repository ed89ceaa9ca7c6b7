// _channels_last on the CPU: a copy in the channels-last memory format by ATen's own copy.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../prroi_pool.h"

namespace prroi_d2 {
namespace {

at::Tensor channels_last_cpu(const at::Tensor& features) {
  detail::check_channels_last_args(features);
  return at::empty_like(features, at::MemoryFormat::ChannelsLast).copy_(features);
}

}  // namespace

TORCH_LIBRARY_IMPL(prroi_d2, CPU, m) { m.impl("_channels_last", &channels_last_cpu); }

}  // namespace prroi_d2
