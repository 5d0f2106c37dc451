// caffe-serving: "Upsample", replacing the sdist's src/caffe/layers/upsample_layer.cpp (which only knew
// the one-bottom form). Written from the published definitions of the two forms that share the name:
//  - one bottom (YOLO-style forks, the sdist's own): nearest-neighbour enlargement by the integer
//    upsample_param.scale, on both spatial axes (dims_num 4, N x C x H x W) or the last (dims_num 3),
//    top[.., y, x] = bottom[.., y / scale, x / scale]. Behaviour unchanged from the sdist.
//  - two bottoms (SegNet, ENet): max-unpooling. Bottom 1 is the mask top of a MAX Pooling layer: for
//    every pooled value, the index y * W + x of the winning input cell in its (H x W) plane. The top is
//    zero except that each bottom-0 value is written at its mask index. The top's size is
//    upsample_h x upsample_w when given, else H * scale_h (minus 1 with pad_out_h) by W * scale_w
//    (minus 1 with pad_out_w), where scale_h and scale_w default to scale, and scale to SegNet's 2
//    when the file does not set it.
// Inference only.
#include <sstream>
#include <stdexcept>
#include <vector>

#include "caffe/layer.hpp"
#include "caffe/layer_factory.hpp"
#include "caffe/util/math_functions.hpp"

namespace caffe {

template <typename Dtype>
class ForkUpsampleLayer : public Layer<Dtype> {
 public:
  explicit ForkUpsampleLayer(const LayerParameter& param) : Layer<Dtype>(param) {}

  virtual void LayerSetUp(const vector<Blob<Dtype>*>& bottom, const vector<Blob<Dtype>*>& top) {
    const UpsampleParameter& p = this->layer_param_.upsample_param();
    if (bottom.size() == 1) {
      CHECK(!p.has_upsample_h() && !p.has_upsample_w() && !p.has_scale_h() && !p.has_scale_w())
          << "Upsample: upsample_h/upsample_w/scale_h/scale_w need the pooling mask as a second bottom";
      scale_h_ = scale_w_ = p.scale();
      CHECK_GT(scale_h_, 0) << "Upsample: scale must be positive";
      CHECK(p.dims_num() == 3 || p.dims_num() == 4) << "Upsample: dims_num must be 3 or 4";
      return;
    }
    const int scale = p.has_scale() ? p.scale() : 2;
    scale_h_ = p.has_scale_h() ? p.scale_h() : scale;
    scale_w_ = p.has_scale_w() ? p.scale_w() : scale;
    CHECK(scale_h_ > 0 && scale_w_ > 0) << "Upsample: scale must be positive";
  }

  virtual void Reshape(const vector<Blob<Dtype>*>& bottom, const vector<Blob<Dtype>*>& top) {
    const UpsampleParameter& p = this->layer_param_.upsample_param();
    vector<int> shape = bottom[0]->shape();
    const int axes = bottom[0]->num_axes();
    CHECK_NE(bottom[0], top[0]) << "Upsample cannot run in place";
    if (bottom.size() == 1) {
      CHECK_GE(axes, p.dims_num() == 4 ? 3 : 2) << "Upsample: too few axes for dims_num " << p.dims_num();
      shape[axes - 1] *= scale_w_;
      if (p.dims_num() == 4) shape[axes - 2] *= scale_h_;
      top[0]->Reshape(shape);
      return;
    }
    CHECK_EQ(axes, 4) << "Upsample: max-unpooling needs N x C x H x W";
    CHECK(bottom[1]->shape() == bottom[0]->shape())
        << "Upsample: the mask " << bottom[1]->shape_string() << " must have the input's shape "
        << bottom[0]->shape_string();
    shape[2] = p.has_upsample_h() ? p.upsample_h() : shape[2] * scale_h_ - (p.pad_out_h() ? 1 : 0);
    shape[3] = p.has_upsample_w() ? p.upsample_w() : shape[3] * scale_w_ - (p.pad_out_w() ? 1 : 0);
    CHECK(shape[2] > 0 && shape[3] > 0) << "Upsample: empty output";
    top[0]->Reshape(shape);
  }

  virtual inline const char* type() const { return "Upsample"; }
  virtual inline int MinBottomBlobs() const { return 1; }
  virtual inline int MaxBottomBlobs() const { return 2; }
  virtual inline int ExactNumTopBlobs() const { return 1; }

 protected:
  virtual void Forward_cpu(const vector<Blob<Dtype>*>& bottom, const vector<Blob<Dtype>*>& top) {
    const Dtype* in = bottom[0]->cpu_data();
    Dtype* out = top[0]->mutable_cpu_data();
    const int axes = top[0]->num_axes();
    if (bottom.size() == 1) {
      const bool two_d = this->layer_param_.upsample_param().dims_num() == 4;
      const int out_w = top[0]->shape(axes - 1), in_w = bottom[0]->shape(axes - 1);
      const int out_h = two_d ? top[0]->shape(axes - 2) : 1, in_h = two_d ? bottom[0]->shape(axes - 2) : 1;
      const int planes = bottom[0]->count() / (in_h * in_w);
      for (int p = 0; p < planes; ++p) {
        for (int y = 0; y < out_h; ++y) {
          for (int x = 0; x < out_w; ++x) {
            out[(p * out_h + y) * out_w + x] = in[(p * in_h + y / scale_h_) * in_w + x / scale_w_];
          }
        }
      }
      return;
    }
    const Dtype* mask = bottom[1]->cpu_data();
    const int planes = bottom[0]->shape(0) * bottom[0]->shape(1);
    const int in_size = bottom[0]->count(2), out_size = top[0]->count(2);
    caffe_set(top[0]->count(), Dtype(0), out);
    for (int p = 0; p < planes; ++p) {
      for (int i = 0; i < in_size; ++i) {
        const int index = static_cast<int>(mask[p * in_size + i]);
        if (index < 0 || index >= out_size) {
          // Depends on the data (where the maxima fell), so not a CHECK: an exception fails this forward
          // pass (pycaffe raises RuntimeError) instead of aborting the process that serves the net.
          std::ostringstream msg;
          msg << "Upsample " << this->layer_param_.name() << ": mask index " << index << " is outside the "
              << top[0]->shape(2) << "x" << top[0]->shape(3)
              << " output (set upsample_h/upsample_w to the size of the pooled layer's input)";
          throw std::runtime_error(msg.str());
        }
        out[p * out_size + index] = in[p * in_size + i];
      }
    }
  }
  virtual void Backward_cpu(const vector<Blob<Dtype>*>& top, const vector<bool>& propagate_down,
                            const vector<Blob<Dtype>*>& bottom) {
    LOG(FATAL) << "Upsample: caffe-serving builds this layer for inference only (no Backward)";
  }

  int scale_h_, scale_w_;
};

INSTANTIATE_CLASS(ForkUpsampleLayer);
template <typename Dtype>
shared_ptr<Layer<Dtype> > Creator_ForkUpsample(const LayerParameter& param) {
  return shared_ptr<Layer<Dtype> >(new ForkUpsampleLayer<Dtype>(param));
}
REGISTER_LAYER_CREATOR(Upsample, Creator_ForkUpsample);

}  // namespace caffe
