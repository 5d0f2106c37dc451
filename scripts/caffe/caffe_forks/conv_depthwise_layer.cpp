// caffe-serving: ConvolutionDepthwise (MobileNet/ShuffleNet forks; also registered under the other
// forks' name DepthwiseConvolution), written from its definition: a 2-D convolution in which every
// output channel o sees one input channel, o / (num_output / C), i.e. Caffe's Convolution with
// group = C, computed directly instead of through im2col. It reads convolution_param (num_output,
// kernel, stride, pad, dilation, bias_term, fillers); its weights have Caffe's grouped-convolution
// shape (num_output, 1, kh, kw), so weights trained as Convolution with group = C load unchanged.
// Inference only.
#include <vector>

#include "caffe/filler.hpp"
#include "caffe/layer.hpp"
#include "caffe/layer_factory.hpp"

namespace caffe {

template <typename Dtype>
class ConvolutionDepthwiseLayer : public Layer<Dtype> {
 public:
  explicit ConvolutionDepthwiseLayer(const LayerParameter& param) : Layer<Dtype>(param) {}

  virtual void LayerSetUp(const vector<Blob<Dtype>*>& bottom, const vector<Blob<Dtype>*>& top) {
    const ConvolutionParameter& p = this->layer_param_.convolution_param();
    CHECK_EQ(bottom[0]->num_axes(), 4) << type() << ": only 2-D (N x C x H x W) inputs";
    CHECK_EQ(p.axis(), 1) << type() << ": only the channel axis 1";
    pick(p.kernel_size(), p.has_kernel_h(), p.kernel_h(), p.kernel_w(), 0, &kernel_h_, &kernel_w_);
    pick(p.stride(), p.has_stride_h(), p.stride_h(), p.stride_w(), 1, &stride_h_, &stride_w_);
    pick(p.pad(), p.has_pad_h(), p.pad_h(), p.pad_w(), 0, &pad_h_, &pad_w_);
    pick(p.dilation(), false, 0, 0, 1, &dilation_h_, &dilation_w_);
    CHECK(kernel_h_ > 0 && kernel_w_ > 0) << type() << ": kernel size must be positive";
    CHECK(stride_h_ > 0 && stride_w_ > 0) << type() << ": stride must be positive";
    channels_ = bottom[0]->shape(1);
    num_output_ = p.has_num_output() ? p.num_output() : channels_;
    CHECK_EQ(num_output_ % channels_, 0)
        << type() << ": num_output " << num_output_ << " is not a multiple of the " << channels_ << " input channels";
    CHECK(!p.has_group() || p.group() == channels_ || p.group() == 1)
        << type() << ": group " << p.group() << " must be the number of input channels (" << channels_ << ")";
    bias_term_ = p.bias_term();
    if (this->blobs_.size() > 0) {
      LOG(INFO) << "Skipping parameter initialization";
    } else {
      this->blobs_.resize(bias_term_ ? 2 : 1);
      vector<int> wshape;
      wshape.push_back(num_output_); wshape.push_back(1);
      wshape.push_back(kernel_h_); wshape.push_back(kernel_w_);
      this->blobs_[0].reset(new Blob<Dtype>(wshape));
      shared_ptr<Filler<Dtype> > wf(GetFiller<Dtype>(p.weight_filler()));
      wf->Fill(this->blobs_[0].get());
      if (bias_term_) {
        this->blobs_[1].reset(new Blob<Dtype>(vector<int>(1, num_output_)));
        shared_ptr<Filler<Dtype> > bf(GetFiller<Dtype>(p.bias_filler()));
        bf->Fill(this->blobs_[1].get());
      }
    }
    this->param_propagate_down_.resize(this->blobs_.size(), true);
  }

  virtual void Reshape(const vector<Blob<Dtype>*>& bottom, const vector<Blob<Dtype>*>& top) {
    CHECK_EQ(bottom[0]->shape(1), channels_) << type() << ": the input's channel count changed";
    CHECK_EQ(this->blobs_[0]->count(), num_output_ * kernel_h_ * kernel_w_)
        << type() << ": weights " << this->blobs_[0]->shape_string() << " are not (" << num_output_
        << ", 1, " << kernel_h_ << ", " << kernel_w_ << ")";
    const int h = bottom[0]->shape(2), w = bottom[0]->shape(3);
    out_h_ = (h + 2 * pad_h_ - (dilation_h_ * (kernel_h_ - 1) + 1)) / stride_h_ + 1;
    out_w_ = (w + 2 * pad_w_ - (dilation_w_ * (kernel_w_ - 1) + 1)) / stride_w_ + 1;
    CHECK(out_h_ > 0 && out_w_ > 0) << type() << ": the kernel does not fit the " << h << "x" << w << " input";
    vector<int> shape;
    shape.push_back(bottom[0]->shape(0)); shape.push_back(num_output_);
    shape.push_back(out_h_); shape.push_back(out_w_);
    for (int i = 0; i < top.size(); ++i) {
      CHECK_NE(bottom[i], top[i]) << type() << " cannot run in place";
      top[i]->Reshape(shape);
    }
  }

  virtual inline const char* type() const { return "ConvolutionDepthwise"; }
  virtual inline int MinBottomBlobs() const { return 1; }
  virtual inline int MinTopBlobs() const { return 1; }
  virtual inline bool EqualNumBottomTopBlobs() const { return true; }

 protected:
  virtual void Forward_cpu(const vector<Blob<Dtype>*>& bottom, const vector<Blob<Dtype>*>& top) {
    const Dtype* weight = this->blobs_[0]->cpu_data();
    const Dtype* bias = bias_term_ ? this->blobs_[1]->cpu_data() : NULL;
    const int multiplier = num_output_ / channels_;
    const int kernel = kernel_h_ * kernel_w_;
    for (int b = 0; b < bottom.size(); ++b) {
      const int num = bottom[b]->shape(0), h = bottom[b]->shape(2), w = bottom[b]->shape(3);
      const Dtype* in = bottom[b]->cpu_data();
      Dtype* out = top[b]->mutable_cpu_data();
      for (int n = 0; n < num; ++n) {
        for (int o = 0; o < num_output_; ++o) {
          const Dtype* plane = in + (n * channels_ + o / multiplier) * h * w;
          const Dtype* k = weight + o * kernel;
          Dtype* dst = out + (n * num_output_ + o) * out_h_ * out_w_;
          for (int oy = 0; oy < out_h_; ++oy) {
            for (int ox = 0; ox < out_w_; ++ox) {
              Dtype sum = 0;
              for (int ky = 0; ky < kernel_h_; ++ky) {
                const int iy = oy * stride_h_ - pad_h_ + ky * dilation_h_;
                if (iy < 0 || iy >= h) continue;
                for (int kx = 0; kx < kernel_w_; ++kx) {
                  const int ix = ox * stride_w_ - pad_w_ + kx * dilation_w_;
                  if (ix < 0 || ix >= w) continue;
                  sum += k[ky * kernel_w_ + kx] * plane[iy * w + ix];
                }
              }
              dst[oy * out_w_ + ox] = bias ? sum + bias[o] : sum;
            }
          }
        }
      }
    }
  }
  virtual void Backward_cpu(const vector<Blob<Dtype>*>& top, const vector<bool>& propagate_down,
                            const vector<Blob<Dtype>*>& bottom) {
    LOG(FATAL) << type() << ": caffe-serving builds this layer for inference only (no Backward)";
  }

 private:
  // Caffe's rule for a 2-D geometry: *_h/*_w when given, else the repeated field (one value for both
  // axes, or one per axis), else the default.
  void pick(const google::protobuf::RepeatedField<google::protobuf::uint32>& values, bool has_hw, int h, int w, int dflt,
            int* out_h, int* out_w) {
    if (has_hw) {
      *out_h = h; *out_w = w;
    } else if (values.size() == 0) {
      *out_h = *out_w = dflt;
    } else {
      CHECK_LE(values.size(), 2) << type() << ": at most one value per spatial axis";
      *out_h = values.Get(0);
      *out_w = values.Get(values.size() - 1);
    }
  }

  int kernel_h_, kernel_w_, stride_h_, stride_w_, pad_h_, pad_w_, dilation_h_, dilation_w_;
  int channels_, num_output_, out_h_, out_w_;
  bool bias_term_;
};

INSTANTIATE_CLASS(ConvolutionDepthwiseLayer);
REGISTER_LAYER_CLASS(ConvolutionDepthwise);
REGISTER_LAYER_CREATOR(DepthwiseConvolution, Creator_ConvolutionDepthwiseLayer);

}  // namespace caffe
