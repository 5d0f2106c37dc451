// caffe-serving: the "ROIPooling" layer of Fast/Faster R-CNN (rbgirshick's py-faster-rcnn Caffe), written
// from its published definition: max pooling of each region of interest into a fixed grid.
//  - bottom[0]: the feature map (N x C x H x W); bottom[1]: R regions (R x 5, or R x 5 x 1 x 1), each
//    (batch index, x1, y1, x2, y2) in input-image pixels.
//  - roi_pooling_param: pooled_h, pooled_w (the grid) and spatial_scale (image pixels -> feature cells,
//    e.g. 1/16), with the fork's field numbers 1-3 and LayerParameter number 8266711.
//  - Each region: its corners are scaled and rounded half away from zero (C's round); its size is
//    (x2 - x1 + 1) x (y2 - y1 + 1) cells, at least 1 x 1. Grid cell (ph, pw) spans rows
//    [floor(ph * h / pooled_h), ceil((ph + 1) * h / pooled_h)) offset by y1, columns likewise, clipped to
//    the map; its value is the maximum there, 0 where the clipped cell is empty.
//  - top[0]: R x C x pooled_h x pooled_w.
// GPU kernel: none (Caffe's default Forward_gpu runs this CPU code). Inference only.
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <sstream>
#include <stdexcept>
#include <vector>

#include "caffe/layer.hpp"
#include "caffe/layer_factory.hpp"

namespace caffe {

template <typename Dtype>
class ROIPoolingLayer : public Layer<Dtype> {
 public:
  explicit ROIPoolingLayer(const LayerParameter& param) : Layer<Dtype>(param) {}

  virtual void LayerSetUp(const vector<Blob<Dtype>*>& bottom, const vector<Blob<Dtype>*>& top) {
    const ROIPoolingParameter& p = this->layer_param_.roi_pooling_param();
    CHECK_GT(p.pooled_h(), 0) << "ROIPooling: pooled_h must be > 0";
    CHECK_GT(p.pooled_w(), 0) << "ROIPooling: pooled_w must be > 0";
    pooled_h_ = p.pooled_h();
    pooled_w_ = p.pooled_w();
    spatial_scale_ = p.spatial_scale();
  }

  virtual void Reshape(const vector<Blob<Dtype>*>& bottom, const vector<Blob<Dtype>*>& top) {
    CHECK_EQ(bottom[0]->num_axes(), 4) << "ROIPooling: the feature map must be N x C x H x W";
    CHECK_EQ(bottom[1]->count() % 5, 0) << "ROIPooling: each region is 5 numbers (batch index, x1, y1, x2, y2)";
    CHECK_EQ(bottom[1]->count(), bottom[1]->shape(0) * 5)
        << "ROIPooling: the regions must be R x 5 (or R x 5 x 1 x 1), got " << bottom[1]->shape_string();
    top[0]->Reshape(bottom[1]->shape(0), bottom[0]->shape(1), pooled_h_, pooled_w_);
  }

  virtual inline const char* type() const { return "ROIPooling"; }
  virtual inline int ExactNumBottomBlobs() const { return 2; }
  virtual inline int ExactNumTopBlobs() const { return 1; }

 protected:
  virtual void Forward_cpu(const vector<Blob<Dtype>*>& bottom, const vector<Blob<Dtype>*>& top) {
    const int num = bottom[0]->shape(0), channels = bottom[0]->shape(1);
    const int height = bottom[0]->shape(2), width = bottom[0]->shape(3);
    const int rois = bottom[1]->shape(0);
    const Dtype* roi = bottom[1]->cpu_data();
    Dtype* out = top[0]->mutable_cpu_data();
    for (int r = 0; r < rois; ++r, roi += 5) {
      const int n = static_cast<int>(roi[0]);
      if (n < 0 || n >= num) {  // data, not the net's structure: fail this pass, not the process
        std::ostringstream msg;
        msg << "ROIPooling " << this->layer_param_.name() << ": region " << r << " names batch index " << roi[0]
            << ", outside the " << num << " images of the feature map";
        throw std::runtime_error(msg.str());
      }
      const int x1 = static_cast<int>(std::round(roi[1] * spatial_scale_));
      const int y1 = static_cast<int>(std::round(roi[2] * spatial_scale_));
      const int x2 = static_cast<int>(std::round(roi[3] * spatial_scale_));
      const int y2 = static_cast<int>(std::round(roi[4] * spatial_scale_));
      const int roi_h = std::max(y2 - y1 + 1, 1), roi_w = std::max(x2 - x1 + 1, 1);
      const Dtype bin_h = static_cast<Dtype>(roi_h) / static_cast<Dtype>(pooled_h_);
      const Dtype bin_w = static_cast<Dtype>(roi_w) / static_cast<Dtype>(pooled_w_);
      for (int c = 0; c < channels; ++c) {
        const Dtype* plane = bottom[0]->cpu_data() + (n * channels + c) * height * width;
        for (int ph = 0; ph < pooled_h_; ++ph) {
          int hs = static_cast<int>(std::floor(static_cast<Dtype>(ph) * bin_h));
          int he = static_cast<int>(std::ceil(static_cast<Dtype>(ph + 1) * bin_h));
          hs = std::min(std::max(hs + y1, 0), height);
          he = std::min(std::max(he + y1, 0), height);
          for (int pw = 0; pw < pooled_w_; ++pw) {
            int ws = static_cast<int>(std::floor(static_cast<Dtype>(pw) * bin_w));
            int we = static_cast<int>(std::ceil(static_cast<Dtype>(pw + 1) * bin_w));
            ws = std::min(std::max(ws + x1, 0), width);
            we = std::min(std::max(we + x1, 0), width);
            Dtype best = (he <= hs || we <= ws) ? Dtype(0) : -FLT_MAX;
            for (int h = hs; h < he; ++h) {
              for (int w = ws; w < we; ++w) best = std::max(best, plane[h * width + w]);
            }
            *out++ = best;
          }
        }
      }
    }
  }
  virtual void Backward_cpu(const vector<Blob<Dtype>*>& top, const vector<bool>& propagate_down,
                            const vector<Blob<Dtype>*>& bottom) {
    LOG(FATAL) << "ROIPooling: caffe-serving builds this layer for inference only (no Backward)";
  }

  int pooled_h_, pooled_w_;
  Dtype spatial_scale_;
};

INSTANTIATE_CLASS(ROIPoolingLayer);
REGISTER_LAYER_CLASS(ROIPooling);

}  // namespace caffe
