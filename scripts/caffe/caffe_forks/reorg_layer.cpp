// caffe-serving: YOLOv2's "Reorg" (the passthrough layer of darknet's yolo-voc.cfg, as the Caffe ports of
// YOLOv2 carry it for converted darknet weights), written from darknet's published definition.
//  - reorg_param: stride s (default 2) and reverse (default false).
//  - Forward (reverse false), bottom N x C x H x W -> top N x (C s^2) x (H / s) x (W / s): darknet's
//    reorg reads its input as if it were N x (C / s^2) x (H s) x (W s) and writes element (n, k, j, i)
//    of an N x C x H x W array: out[n, k, j, i] = in'[n, k % (C / s^2), j s + (k / (C / s^2)) / s,
//    i s + (k / (C / s^2)) % s] (all in memory order), then reads that memory as the top shape. It is
//    not the space-to-depth of ONNX; it is what darknet computes, so converted weights see what they
//    were trained on. C must divide by s^2 and H, W by s.
//  - reverse true, bottom N x C x H x W -> top N x (C / s^2) x (H s) x (W s): the inverse direction of
//    the same index map (out'[n, k % (C / s^2), j s + .., i s + ..] = in[n, k, j, i]).
// GPU kernel: none (Caffe's default Forward_gpu runs this CPU code). Inference only.
#include <vector>

#include "caffe/layer.hpp"
#include "caffe/layer_factory.hpp"

namespace caffe {

template <typename Dtype>
class ReorgLayer : public Layer<Dtype> {
 public:
  explicit ReorgLayer(const LayerParameter& param) : Layer<Dtype>(param) {}

  virtual void LayerSetUp(const vector<Blob<Dtype>*>& bottom, const vector<Blob<Dtype>*>& top) {
    stride_ = this->layer_param_.reorg_param().stride();
    reverse_ = this->layer_param_.reorg_param().reverse();
    CHECK_GT(stride_, 0) << "Reorg: stride must be > 0";
    CHECK_NE(top[0], bottom[0]) << "Reorg: cannot run in place";
  }

  virtual void Reshape(const vector<Blob<Dtype>*>& bottom, const vector<Blob<Dtype>*>& top) {
    CHECK_EQ(bottom[0]->num_axes(), 4) << "Reorg: the input must be N x C x H x W";
    const int n = bottom[0]->shape(0), c = bottom[0]->shape(1), h = bottom[0]->shape(2), w = bottom[0]->shape(3);
    const int s2 = stride_ * stride_;
    if (reverse_) {
      CHECK_EQ(c % s2, 0) << "Reorg: " << c << " channels do not divide by stride^2 = " << s2;
      top[0]->Reshape(n, c / s2, h * stride_, w * stride_);
    } else {
      CHECK_EQ(c % s2, 0) << "Reorg: " << c << " channels do not divide by stride^2 = " << s2;
      CHECK_EQ(h % stride_, 0) << "Reorg: height " << h << " does not divide by stride " << stride_;
      CHECK_EQ(w % stride_, 0) << "Reorg: width " << w << " does not divide by stride " << stride_;
      top[0]->Reshape(n, c * s2, h / stride_, w / stride_);
    }
  }

  virtual inline const char* type() const { return "Reorg"; }
  virtual inline int ExactNumBottomBlobs() const { return 1; }
  virtual inline int ExactNumTopBlobs() const { return 1; }

 protected:
  virtual void Forward_cpu(const vector<Blob<Dtype>*>& bottom, const vector<Blob<Dtype>*>& top) {
    // darknet's loop over the bottom's N x C x H x W; `wide` indexes the same memory as N x C/s^2 x Hs x Ws
    const int num = bottom[0]->shape(0), c = bottom[0]->shape(1), h = bottom[0]->shape(2), w = bottom[0]->shape(3);
    const int s = stride_, c_wide = c / (s * s);
    const Dtype* in = bottom[0]->cpu_data();
    Dtype* out = top[0]->mutable_cpu_data();
    for (int b = 0; b < num; ++b) {
      for (int k = 0; k < c; ++k) {
        const int c2 = k % c_wide, offset = k / c_wide;
        for (int j = 0; j < h; ++j) {
          for (int i = 0; i < w; ++i) {
            const int flat = i + w * (j + h * (k + c * b));
            const int wide = (i * s + offset % s) + w * s * ((j * s + offset / s) + h * s * (c2 + c_wide * b));
            if (reverse_) {
              out[wide] = in[flat];
            } else {
              out[flat] = in[wide];
            }
          }
        }
      }
    }
  }
  virtual void Backward_cpu(const vector<Blob<Dtype>*>& top, const vector<bool>& propagate_down,
                            const vector<Blob<Dtype>*>& bottom) {
    LOG(FATAL) << "Reorg: caffe-serving builds this layer for inference only (no Backward)";
  }

  int stride_;
  bool reverse_;
};

INSTANTIATE_CLASS(ReorgLayer);
REGISTER_LAYER_CLASS(Reorg);

}  // namespace caffe
