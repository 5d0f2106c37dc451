// caffe-serving: the "BN" layer of two forks that gave one type name two blob layouts, written from their
// published definitions. Which layout a layer has is read from its bn_param fields (and, when the deploy
// file embeds blobs, their count), never guessed from values:
//  - SegNet and ENet (caffe-segnet, caffe-enet): two blobs, scale and shift (1 x C x 1 x 1), and
//    bn_param.bn_mode. The default when bn_param names no field of the other fork.
//    - INFERENCE: top = scale * x + shift per channel. SegNet's and ENet's compute_bn_statistics.py fold
//      the dataset's mean and variance into these two blobs (scale' = scale / sqrt(var + eps),
//      shift' = shift - scale * mean / sqrt(var + eps)) before setting this mode: the published
//      inference weights are meant for it.
//    - LEARN (the default): normalize each channel with the statistics of the batch itself (mean and
//      biased variance over N, H, W; eps = bn_param.eps when given, else the forks' 1e-9), then scale
//      and shift. Optional tops 1 and 2 receive that batch mean and variance (1 x C x 1 x 1): the
//      statistics compute_bn_statistics.py averages. Such a net's output for one image depends on the
//      others in its batch.
//  - PSPNet and ICNet (hszhao's Caffe, after yjxiong's): four blobs, slope, bias, moving mean and moving
//    variance (1 x C x 1 x 1), chosen when bn_param sets slope_filler, bias_filler, momentum or frozen
//    (the sdist's BNParameter fields 1-5, the fork's own numbers). In the TEST phase or with
//    `frozen: true`: top = slope * (x - mean) / sqrt(variance + eps) + bias, eps = bn_param.eps
//    (default 1e-5). In TRAIN without frozen: the batch's own mean and biased variance instead. One top.
// The sdist's own BNLayer (yjxiong's, whose 4th blob is an inverse std) is compiled but never registered;
// this one takes the type name "BN". GPU kernel: none (Caffe's default Forward_gpu runs this CPU code).
// Inference only.
#include <algorithm>
#include <cmath>
#include <vector>

#include "caffe/filler.hpp"
#include "caffe/layer.hpp"
#include "caffe/layer_factory.hpp"
#include "caffe/util/math_functions.hpp"

namespace caffe {

template <typename Dtype>
class SegNetBNLayer : public Layer<Dtype> {
 public:
  explicit SegNetBNLayer(const LayerParameter& param) : Layer<Dtype>(param) {}

  virtual void LayerSetUp(const vector<Blob<Dtype>*>& bottom, const vector<Blob<Dtype>*>& top) {
    const BNParameter& p = this->layer_param_.bn_param();
    const bool psp_fields = p.has_slope_filler() || p.has_bias_filler() || p.has_momentum() || p.has_frozen();
    const bool segnet_fields = p.has_bn_mode() || p.has_scale_filler() || p.has_shift_filler();
    CHECK(!(psp_fields && segnet_fields)) << "BN: bn_param mixes PSPNet's fields (slope_filler, bias_filler, "
        "momentum, frozen) with SegNet's (bn_mode, scale_filler, shift_filler): one layer has one layout";
    if (this->blobs_.size() > 0) {  // blobs embedded in the deploy file: their count says the layout
      CHECK(this->blobs_.size() == 2 || this->blobs_.size() == 4) << "BN: expected 2 blobs (SegNet: scale, "
          "shift) or 4 (PSPNet: slope, bias, mean, variance), got " << this->blobs_.size();
      pspnet_ = this->blobs_.size() == 4;
    } else {
      pspnet_ = psp_fields;
    }
    CHECK_GE(bottom[0]->num_axes(), 2) << "BN: the input needs a channel axis";
    const int channels = bottom[0]->shape(1);
    if (pspnet_) {
      use_stats_ = this->phase_ == TEST || p.frozen();
      eps_ = p.eps();
      CHECK_EQ(top.size(), 1) << "BN: PSPNet's layout has one top";
    } else {
      use_stats_ = p.bn_mode() == BNParameter_BNMode_INFERENCE;  // scale and shift alone
      eps_ = p.has_eps() ? p.eps() : Dtype(1e-9);
      CHECK(!use_stats_ || top.size() == 1)
          << "BN: the batch mean and variance tops exist in bn_mode LEARN only";
    }
    if (this->blobs_.size() > 0) {
      LOG(INFO) << "Skipping parameter initialization";
    } else {
      vector<int> shape;
      shape.push_back(1); shape.push_back(channels); shape.push_back(1); shape.push_back(1);
      this->blobs_.resize(pspnet_ ? 4 : 2);
      for (int i = 0; i < this->blobs_.size(); ++i) this->blobs_[i].reset(new Blob<Dtype>(shape));
      shared_ptr<Filler<Dtype> > scale_filler(GetFiller<Dtype>(pspnet_ ? p.slope_filler() : p.scale_filler()));
      scale_filler->Fill(this->blobs_[0].get());
      shared_ptr<Filler<Dtype> > shift_filler(GetFiller<Dtype>(pspnet_ ? p.bias_filler() : p.shift_filler()));
      shift_filler->Fill(this->blobs_[1].get());
      if (pspnet_) {  // moving mean 0, moving variance 1: the identity until weights are loaded
        caffe_set(channels, Dtype(0), this->blobs_[2]->mutable_cpu_data());
        caffe_set(channels, Dtype(1), this->blobs_[3]->mutable_cpu_data());
      }
    }
    this->param_propagate_down_.resize(this->blobs_.size(), true);
  }

  virtual void Reshape(const vector<Blob<Dtype>*>& bottom, const vector<Blob<Dtype>*>& top) {
    const int channels = bottom[0]->shape(1);
    if (pspnet_) {
      CHECK_EQ(this->blobs_.size(), 4) << "BN: bn_param names PSPNet's fields (slope_filler, bias_filler, "
          "momentum, frozen): expected 4 blobs (slope, bias, mean, variance), got " << this->blobs_.size();
    } else {
      CHECK_EQ(this->blobs_.size(), 2) << "BN: expected 2 blobs (scale, shift) as SegNet and ENet store them, got "
          << this->blobs_.size() << " (PSPNet's 4-blob BN is chosen by its bn_param fields slope_filler, "
          "bias_filler, momentum or frozen)";
    }
    static const char* names[] = {"scale", "shift", "mean", "variance"};
    for (int i = 0; i < this->blobs_.size(); ++i) {
      CHECK_EQ(this->blobs_[i]->count(), channels) << "BN: " << names[i] << " has " << this->blobs_[i]->count()
          << " values for " << channels << " channels";
    }
    top[0]->ReshapeLike(*bottom[0]);
    vector<int> stat_shape;
    stat_shape.push_back(1); stat_shape.push_back(channels); stat_shape.push_back(1); stat_shape.push_back(1);
    for (int i = 1; i < top.size(); ++i) top[i]->Reshape(stat_shape);
  }

  virtual inline const char* type() const { return "BN"; }
  virtual inline int ExactNumBottomBlobs() const { return 1; }
  virtual inline int MinTopBlobs() const { return 1; }
  virtual inline int MaxTopBlobs() const { return 3; }

 protected:
  virtual void Forward_cpu(const vector<Blob<Dtype>*>& bottom, const vector<Blob<Dtype>*>& top) {
    const int num = bottom[0]->shape(0), channels = bottom[0]->shape(1);
    const int spatial = bottom[0]->count(2);
    const Dtype* x = bottom[0]->cpu_data();
    Dtype* y = top[0]->mutable_cpu_data();  // may be x itself (in place)
    const Dtype* scale = this->blobs_[0]->cpu_data();
    const Dtype* shift = this->blobs_[1]->cpu_data();
    for (int c = 0; c < channels; ++c) {
      Dtype a = scale[c], b = shift[c], m = 0;
      if (pspnet_ && use_stats_) {  // slope * (x - mean) / sqrt(variance + eps) + bias
        const Dtype inv_std = Dtype(1) / std::sqrt(this->blobs_[3]->cpu_data()[c] + eps_);
        a = scale[c] * inv_std;
        m = this->blobs_[2]->cpu_data()[c];
      } else if (!use_stats_) {  // the batch's own statistics
        double sum = 0, sum_sq = 0;
        for (int n = 0; n < num; ++n) {
          const Dtype* plane = x + (n * channels + c) * spatial;
          for (int i = 0; i < spatial; ++i) { sum += plane[i]; sum_sq += double(plane[i]) * plane[i]; }
        }
        const double count = double(num) * spatial;
        const double mean = sum / count;
        const double var = std::max(sum_sq / count - mean * mean, 0.0);
        if (top.size() > 1) top[1]->mutable_cpu_data()[c] = Dtype(mean);
        if (top.size() > 2) top[2]->mutable_cpu_data()[c] = Dtype(var);
        const double inv_std = 1.0 / std::sqrt(var + double(eps_));
        a = Dtype(scale[c] * inv_std);
        m = Dtype(mean);
      }
      for (int n = 0; n < num; ++n) {
        const int base = (n * channels + c) * spatial;
        for (int i = 0; i < spatial; ++i) y[base + i] = a * (x[base + i] - m) + b;
      }
    }
  }
  virtual void Backward_cpu(const vector<Blob<Dtype>*>& top, const vector<bool>& propagate_down,
                            const vector<Blob<Dtype>*>& bottom) {
    LOG(FATAL) << "BN: caffe-serving builds this layer for inference only (no Backward)";
  }

  bool pspnet_;     // PSPNet's 4 blobs (slope, bias, mean, variance), else SegNet's 2 (scale, shift)
  bool use_stats_;  // PSPNet: the stored mean and variance; SegNet: INFERENCE (scale and shift alone)
  Dtype eps_;
};

INSTANTIATE_CLASS(SegNetBNLayer);
// REGISTER_LAYER_CLASS(BN) would name the sdist's BNLayer: register our class under "BN" by hand.
template <typename Dtype>
shared_ptr<Layer<Dtype> > Creator_SegNetBN(const LayerParameter& param) {
  return shared_ptr<Layer<Dtype> >(new SegNetBNLayer<Dtype>(param));
}
REGISTER_LAYER_CREATOR(BN, Creator_SegNetBN);

}  // namespace caffe
