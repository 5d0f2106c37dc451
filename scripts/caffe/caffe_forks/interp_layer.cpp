// caffe-serving: the "Interp" layer of the DeepLab v2 fork (also in PSPNet's and ICNet's Caffe), written
// from its published definition: bilinear resizing with the align-corners rule.
//  - Input: bottom[0] (N x C x H x W), optionally cropped first: interp_param.pad_beg / pad_end must be
//    <= 0 and remove -pad_beg rows/columns at the start and -pad_end at the end (the effective input
//    is H' = H + pad_beg + pad_end by W' likewise).
//  - Output size, the first rule that applies: a second bottom (its H x W, as some forks allow);
//    shrink_factor alone: (H' - 1) / s + 1; zoom_factor alone: H' + (H' - 1) (z - 1); height and width:
//    those; shrink_factor and zoom_factor: shrink, then zoom. Anything else is refused.
//  - Value: output pixel (y, x) reads the input at (y r_h, x r_w) with r_h = (H' - 1) / (Hout - 1) (0
//    when Hout = 1), r_w likewise, computed in single precision as the fork does; the integer part
//    picks the top-left neighbour, the fraction weights it and its right/lower neighbour (the last
//    row/column has no lower/right neighbour and uses itself). So corners map to corners exactly.
// GPU kernel: none (Caffe's default Forward_gpu runs this CPU code). Inference only.
#include <vector>

#include "caffe/layer.hpp"
#include "caffe/layer_factory.hpp"

namespace caffe {

template <typename Dtype>
class InterpLayer : public Layer<Dtype> {
 public:
  explicit InterpLayer(const LayerParameter& param) : Layer<Dtype>(param) {}

  virtual void LayerSetUp(const vector<Blob<Dtype>*>& bottom, const vector<Blob<Dtype>*>& top) {
    const InterpParameter& p = this->layer_param_.interp_param();
    pad_beg_ = p.pad_beg();
    pad_end_ = p.pad_end();
    CHECK_LE(pad_beg_, 0) << "Interp: pad_beg must be <= 0 (only cropping is defined)";
    CHECK_LE(pad_end_, 0) << "Interp: pad_end must be <= 0 (only cropping is defined)";
  }

  virtual void Reshape(const vector<Blob<Dtype>*>& bottom, const vector<Blob<Dtype>*>& top) {
    CHECK_EQ(bottom[0]->num_axes(), 4) << "Interp: the input must be N x C x H x W";
    const InterpParameter& p = this->layer_param_.interp_param();
    in_h_ = bottom[0]->shape(2);
    in_w_ = bottom[0]->shape(3);
    eff_h_ = in_h_ + pad_beg_ + pad_end_;
    eff_w_ = in_w_ + pad_beg_ + pad_end_;
    CHECK_GT(eff_h_, 0) << "Interp: the cropped input has no rows";
    CHECK_GT(eff_w_, 0) << "Interp: the cropped input has no columns";
    if (bottom.size() > 1) {
      CHECK_EQ(bottom[1]->num_axes(), 4) << "Interp: the size bottom must be N x C x H x W";
      out_h_ = bottom[1]->shape(2);
      out_w_ = bottom[1]->shape(3);
    } else if (p.has_shrink_factor() && !p.has_zoom_factor()) {
      CHECK_GE(p.shrink_factor(), 1) << "Interp: shrink_factor must be >= 1";
      out_h_ = (eff_h_ - 1) / p.shrink_factor() + 1;
      out_w_ = (eff_w_ - 1) / p.shrink_factor() + 1;
    } else if (p.has_zoom_factor() && !p.has_shrink_factor()) {
      CHECK_GE(p.zoom_factor(), 1) << "Interp: zoom_factor must be >= 1";
      out_h_ = eff_h_ + (eff_h_ - 1) * (p.zoom_factor() - 1);
      out_w_ = eff_w_ + (eff_w_ - 1) * (p.zoom_factor() - 1);
    } else if (p.has_height() && p.has_width()) {
      out_h_ = p.height();
      out_w_ = p.width();
    } else if (p.has_shrink_factor() && p.has_zoom_factor()) {
      CHECK_GE(p.shrink_factor(), 1) << "Interp: shrink_factor must be >= 1";
      CHECK_GE(p.zoom_factor(), 1) << "Interp: zoom_factor must be >= 1";
      out_h_ = (eff_h_ - 1) / p.shrink_factor() + 1;
      out_w_ = (eff_w_ - 1) / p.shrink_factor() + 1;
      out_h_ = out_h_ + (out_h_ - 1) * (p.zoom_factor() - 1);
      out_w_ = out_w_ + (out_w_ - 1) * (p.zoom_factor() - 1);
    } else {
      LOG(FATAL) << "Interp: set interp_param height and width, zoom_factor, shrink_factor, or give a second bottom";
    }
    CHECK_GT(out_h_, 0) << "Interp: output height must be > 0";
    CHECK_GT(out_w_, 0) << "Interp: output width must be > 0";
    top[0]->Reshape(bottom[0]->shape(0), bottom[0]->shape(1), out_h_, out_w_);
  }

  virtual inline const char* type() const { return "Interp"; }
  virtual inline int MinBottomBlobs() const { return 1; }
  virtual inline int MaxBottomBlobs() const { return 2; }
  virtual inline int ExactNumTopBlobs() const { return 1; }

 protected:
  virtual void Forward_cpu(const vector<Blob<Dtype>*>& bottom, const vector<Blob<Dtype>*>& top) {
    const int planes = bottom[0]->shape(0) * bottom[0]->shape(1);
    const int y0 = -pad_beg_, x0 = -pad_beg_;  // where the cropped input starts in each plane
    const float rh = out_h_ > 1 ? static_cast<float>(eff_h_ - 1) / (out_h_ - 1) : 0.f;
    const float rw = out_w_ > 1 ? static_cast<float>(eff_w_ - 1) / (out_w_ - 1) : 0.f;
    const Dtype* src = bottom[0]->cpu_data();
    Dtype* dst = top[0]->mutable_cpu_data();
    const int in_plane = in_h_ * in_w_, out_plane = out_h_ * out_w_;
    for (int oy = 0; oy < out_h_; ++oy) {
      const float fy = eff_h_ == out_h_ ? oy : rh * oy;
      const int iy = static_cast<int>(fy);
      const int dy = iy < eff_h_ - 1 ? in_w_ : 0;  // the next row, or the same one at the edge
      const Dtype ly = fy - iy, hy = Dtype(1) - ly;
      for (int ox = 0; ox < out_w_; ++ox) {
        const float fx = eff_w_ == out_w_ ? ox : rw * ox;
        const int ix = static_cast<int>(fx);
        const int dx = ix < eff_w_ - 1 ? 1 : 0;
        const Dtype lx = fx - ix, hx = Dtype(1) - lx;
        const Dtype* a = src + (y0 + iy) * in_w_ + (x0 + ix);
        Dtype* b = dst + oy * out_w_ + ox;
        for (int c = 0; c < planes; ++c) {
          *b = hy * (hx * a[0] + lx * a[dx]) + ly * (hx * a[dy] + lx * a[dy + dx]);
          a += in_plane;
          b += out_plane;
        }
      }
    }
  }
  virtual void Backward_cpu(const vector<Blob<Dtype>*>& top, const vector<bool>& propagate_down,
                            const vector<Blob<Dtype>*>& bottom) {
    LOG(FATAL) << "Interp: caffe-serving builds this layer for inference only (no Backward)";
  }

  int pad_beg_, pad_end_;
  int in_h_, in_w_, eff_h_, eff_w_, out_h_, out_w_;
};

INSTANTIATE_CLASS(InterpLayer);
REGISTER_LAYER_CLASS(Interp);

}  // namespace caffe
