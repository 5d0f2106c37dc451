"""Stand-ins for the lines of Caffe's sources that our patch scripts anchor on, laid out as in the sdist:
the tests run each patch on them and read what it wrote."""

from __future__ import annotations

from pathlib import Path

PYCAFFE_SNIPPET = """\
void set_mode_cpu() { Caffe::set_mode(Caffe::CPU); }
void set_mode_gpu() { Caffe::set_mode(Caffe::GPU); }
  bp::class_<Net<Dtype>, shared_ptr<Net<Dtype> >, boost::noncopyable >("Net", bp::no_init)
    .def("_forward", &Net<Dtype>::ForwardFromTo)
    .def("_backward", &Net<Dtype>::BackwardFromTo)
"""
# brocolli-caffe 9.0.2's src/caffe/util/io.cpp, the lines the limit patch anchors on
IO_CPP_SNIPPET = """\
#include <fcntl.h>
bool ReadProtoFromBinaryFile(const char* filename, Message* proto) {
  CodedInputStream* coded_input = new CodedInputStream(raw_input);
  coded_input->SetTotalBytesLimit(536870912);
}
bool ReadProtoFromBinaryMemory(unsigned char* buffer, int len, Message* proto) {
  coded_input->SetTotalBytesLimit(536870912);
}
"""

# brocolli-caffe 9.0.2's include/caffe/layers/python_layer.hpp, the lines the Python layer's GIL patch anchors on
PYTHON_LAYER_SNIPPET = """\
namespace caffe {
    self_.attr("param_str") = bp::str(
    self_.attr("reshape")(bottom, top);
    self_.attr("forward")(bottom, top);
    self_.attr("backward")(top, propagate_down, bottom);
}
"""

# brocolli-caffe 9.0.2's src/caffe/layers/pooling_layer.cpp, the lines the pooling patch anchors on and rewrites
POOLING_CPP_SNIPPET = """\
template <typename Dtype>
void PoolingLayer<Dtype>::Forward_cpu(const vector<Blob<Dtype>*>& bottom,
      const vector<Blob<Dtype>*>& top) {
  const bool use_top_mask = top.size() > 1;
    for (int n = 0; n < bottom[0]->num(); ++n) {
      for (int c = 0; c < channels_; ++c) {
        for (int ph = 0; ph < pooled_height_; ++ph) {
          for (int pw = 0; pw < pooled_width_; ++pw) {
            int hstart = ph * stride_h_ - pad_h_;
            int wstart = pw * stride_w_ - pad_w_;
            int hend = min(hstart + kernel_h_, height_);
            int wend = min(wstart + kernel_w_, width_);
          }
        }
        bottom_data += bottom[0]->offset(0, 1);
        top_data += top[0]->offset(0, 1);
      }
    }
}
template <typename Dtype>
void PoolingLayer<Dtype>::Backward_cpu(const vector<Blob<Dtype>*>& top,
    for (int n = 0; n < top[0]->num(); ++n) {
        bottom_diff += bottom[0]->offset(0, 1);
}
"""


def caffe_tree(root: Path) -> Path:
    (root / "python" / "caffe").mkdir(parents=True)
    (root / "src" / "caffe" / "util").mkdir(parents=True)
    (root / "python" / "caffe" / "_caffe.cpp").write_text(PYCAFFE_SNIPPET)
    (root / "src" / "caffe" / "util" / "io.cpp").write_text(IO_CPP_SNIPPET)
    (root / "include" / "caffe" / "layers").mkdir(parents=True)
    (root / "include" / "caffe" / "layers" / "python_layer.hpp").write_text(PYTHON_LAYER_SNIPPET)
    fork_targets(root)  # what patch_caffe_forks.py edits (and makes src/caffe/layers)
    (root / "src" / "caffe" / "layers" / "pooling_layer.cpp").write_text(POOLING_CPP_SNIPPET)
    return root


def fork_targets(root: Path) -> None:
    (root / "src" / "caffe" / "proto").mkdir(parents=True, exist_ok=True)
    (root / "src" / "caffe" / "layers").mkdir(parents=True, exist_ok=True)
    (root / "src" / "caffe" / "proto" / "caffe.proto").write_text("".join(
        f"message {m} {{\n  optional int32 x = 1;\n}}\n"
        for m in ("LayerParameter", "BNParameter", "DetectionOutputParameter", "UpsampleParameter")))
    (root / "src" / "caffe" / "layers" / "detection_output_layer.cpp").write_text(
        "  const bool clip_bbox = false;\n  DecodeBBoxesAll(clip_bbox);\n")
