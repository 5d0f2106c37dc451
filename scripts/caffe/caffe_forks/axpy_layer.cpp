// caffe-serving: the Axpy layer of SE-Nets (Hu et al., "Squeeze-and-Excitation Networks"), written
// from its published definition: top = a * x + y, where a (N x C, or N x C x 1 x 1) scales every
// channel of x (N x C x H x W) and y has x's shape. It fuses an SE block's channel scaling and the
// residual addition. Inference only: Backward is not built.
#include <vector>

#include "caffe/layer.hpp"
#include "caffe/layer_factory.hpp"

namespace caffe {

template <typename Dtype>
class AxpyLayer : public Layer<Dtype> {
 public:
  explicit AxpyLayer(const LayerParameter& param) : Layer<Dtype>(param) {}
  virtual void Reshape(const vector<Blob<Dtype>*>& bottom, const vector<Blob<Dtype>*>& top) {
    const Blob<Dtype>& a = *bottom[0];
    const Blob<Dtype>& x = *bottom[1];
    CHECK(x.shape() == bottom[2]->shape())
        << "Axpy: x (bottom 1) " << x.shape_string() << " and y (bottom 2) "
        << bottom[2]->shape_string() << " must have the same shape";
    CHECK_GE(x.num_axes(), 2) << "Axpy: x needs a channel axis";
    CHECK_EQ(a.count(), x.shape(0) * x.shape(1))
        << "Axpy: a (bottom 0) " << a.shape_string() << " must hold one value per sample and channel of x "
        << x.shape_string();
    top[0]->ReshapeLike(x);
  }
  virtual inline const char* type() const { return "Axpy"; }
  virtual inline int ExactNumBottomBlobs() const { return 3; }
  virtual inline int ExactNumTopBlobs() const { return 1; }

 protected:
  virtual void Forward_cpu(const vector<Blob<Dtype>*>& bottom, const vector<Blob<Dtype>*>& top) {
    const Dtype* a = bottom[0]->cpu_data();
    const Dtype* x = bottom[1]->cpu_data();
    const Dtype* y = bottom[2]->cpu_data();
    Dtype* out = top[0]->mutable_cpu_data();
    const int planes = bottom[1]->shape(0) * bottom[1]->shape(1);
    const int spatial = bottom[1]->count(2);
    for (int p = 0; p < planes; ++p) {
      const Dtype s = a[p];
      const int base = p * spatial;
      for (int i = 0; i < spatial; ++i) out[base + i] = s * x[base + i] + y[base + i];
    }
  }
  virtual void Backward_cpu(const vector<Blob<Dtype>*>& top, const vector<bool>& propagate_down,
                            const vector<Blob<Dtype>*>& bottom) {
    LOG(FATAL) << "Axpy: caffe-serving builds this layer for inference only (no Backward)";
  }
};

INSTANTIATE_CLASS(AxpyLayer);
REGISTER_LAYER_CLASS(Axpy);

}  // namespace caffe
