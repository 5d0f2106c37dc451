// caffe-serving: ShuffleChannel of ShuffleNet (Zhang et al., "ShuffleNet"), written from its published
// definition: with g = shuffle_channel_param.group, view the C channels as a g x (C/g) matrix and
// transpose it, so output channel j*g + i is input channel i*(C/g) + j. Inference only.
#include <vector>

#include "caffe/layer.hpp"
#include "caffe/layer_factory.hpp"
#include "caffe/util/math_functions.hpp"

namespace caffe {

template <typename Dtype>
class ShuffleChannelLayer : public Layer<Dtype> {
 public:
  explicit ShuffleChannelLayer(const LayerParameter& param) : Layer<Dtype>(param) {}
  virtual void LayerSetUp(const vector<Blob<Dtype>*>& bottom, const vector<Blob<Dtype>*>& top) {
    group_ = this->layer_param_.shuffle_channel_param().group();
    CHECK_GT(group_, 0) << "ShuffleChannel: group must be positive";
  }
  virtual void Reshape(const vector<Blob<Dtype>*>& bottom, const vector<Blob<Dtype>*>& top) {
    CHECK_GE(bottom[0]->num_axes(), 2) << "ShuffleChannel: the input needs a channel axis";
    CHECK_EQ(bottom[0]->shape(1) % group_, 0)
        << "ShuffleChannel: " << bottom[0]->shape(1) << " channels do not split into " << group_ << " groups";
    CHECK_NE(bottom[0], top[0]) << "ShuffleChannel cannot run in place";
    top[0]->ReshapeLike(*bottom[0]);
  }
  virtual inline const char* type() const { return "ShuffleChannel"; }
  virtual inline int ExactNumBottomBlobs() const { return 1; }
  virtual inline int ExactNumTopBlobs() const { return 1; }

 protected:
  virtual void Forward_cpu(const vector<Blob<Dtype>*>& bottom, const vector<Blob<Dtype>*>& top) {
    const int num = bottom[0]->shape(0), channels = bottom[0]->shape(1);
    const int spatial = bottom[0]->count(2), per_group = channels / group_;
    const Dtype* in = bottom[0]->cpu_data();
    Dtype* out = top[0]->mutable_cpu_data();
    for (int n = 0; n < num; ++n) {
      for (int i = 0; i < group_; ++i) {
        for (int j = 0; j < per_group; ++j) {
          const int from = (n * channels + i * per_group + j) * spatial;
          const int to = (n * channels + j * group_ + i) * spatial;
          caffe_copy(spatial, in + from, out + to);
        }
      }
    }
  }
  virtual void Backward_cpu(const vector<Blob<Dtype>*>& top, const vector<bool>& propagate_down,
                            const vector<Blob<Dtype>*>& bottom) {
    LOG(FATAL) << "ShuffleChannel: caffe-serving builds this layer for inference only (no Backward)";
  }

  int group_;
};

INSTANTIATE_CLASS(ShuffleChannelLayer);
REGISTER_LAYER_CLASS(ShuffleChannel);

}  // namespace caffe
