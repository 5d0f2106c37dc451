// caffe-serving: the CPU code of R-FCN's "PSROIPooling" (position-sensitive ROI pooling, daijifeng001's
// R-FCN Caffe), written from its published definition. It replaces the sdist's psroi_pooling_layer.cpp,
// whose Forward_cpu was NOT_IMPLEMENTED; the class is the sdist's header's, and the sdist's CUDA kernel
// (psroi_pooling_layer.cu) stays the GPU path of a CUDA build.
//  - bottom[0]: score maps N x (output_dim * group_size^2) x H x W; bottom[1]: R regions (R x 5), each
//    (batch index, x1, y1, x2, y2) in input-image pixels.
//  - psroi_pooling_param: spatial_scale, output_dim, group_size (the sdist's fields; the grid is
//    group_size x group_size).
//  - Each region: corners rounded half away from zero, then x1 * scale .. (x2 + 1) * scale (floats, not
//    rounded again), its size at least 0.1 cell. Grid cell (ph, pw) spans rows
//    [floor(y1' + ph * h / k), ceil(y1' + (ph + 1) * h / k)), columns likewise, clipped to the map.
//  - top[0] (R x output_dim x k x k) at (r, c, ph, pw): the mean of input channel (c * k + ph) * k + pw
//    over that cell, 0 where the clipped cell is empty.
// Inference only on the CPU (no Backward_cpu).
#include <algorithm>
#include <cmath>
#include <sstream>
#include <stdexcept>
#include <vector>

#include "caffe/layers/psroi_pooling_layer.hpp"

namespace caffe {

template <typename Dtype>
void PSROIPoolingLayer<Dtype>::LayerSetUp(const vector<Blob<Dtype>*>& bottom, const vector<Blob<Dtype>*>& top) {
  const PSROIPoolingParameter& p = this->layer_param_.psroi_pooling_param();
  CHECK_GT(p.output_dim(), 0) << "PSROIPooling: output_dim must be > 0";
  CHECK_GT(p.group_size(), 0) << "PSROIPooling: group_size must be > 0";
  spatial_scale_ = p.spatial_scale();
  output_dim_ = p.output_dim();
  group_size_ = p.group_size();
  pooled_height_ = group_size_;
  pooled_width_ = group_size_;
}

template <typename Dtype>
void PSROIPoolingLayer<Dtype>::Reshape(const vector<Blob<Dtype>*>& bottom, const vector<Blob<Dtype>*>& top) {
  CHECK_EQ(bottom[0]->num_axes(), 4) << "PSROIPooling: the score maps must be N x C x H x W";
  channels_ = bottom[0]->shape(1);
  CHECK_EQ(channels_, output_dim_ * group_size_ * group_size_) << "PSROIPooling: the score maps have "
      << channels_ << " channels, output_dim x group_size^2 is " << output_dim_ * group_size_ * group_size_;
  CHECK_EQ(bottom[1]->count(), bottom[1]->shape(0) * 5)
      << "PSROIPooling: the regions must be R x 5 (or R x 5 x 1 x 1), got " << bottom[1]->shape_string();
  height_ = bottom[0]->shape(2);
  width_ = bottom[0]->shape(3);
  top[0]->Reshape(bottom[1]->shape(0), output_dim_, pooled_height_, pooled_width_);
  mapping_channel_.Reshape(bottom[1]->shape(0), output_dim_, pooled_height_, pooled_width_);
}

template <typename Dtype>
void PSROIPoolingLayer<Dtype>::Forward_cpu(const vector<Blob<Dtype>*>& bottom, const vector<Blob<Dtype>*>& top) {
  const int num = bottom[0]->shape(0), rois = bottom[1]->shape(0), k = group_size_;
  const Dtype* roi = bottom[1]->cpu_data();
  Dtype* out = top[0]->mutable_cpu_data();
  int* mapping = mapping_channel_.mutable_cpu_data();
  for (int r = 0; r < rois; ++r, roi += 5) {
    const int n = static_cast<int>(roi[0]);
    if (n < 0 || n >= num) {  // data, not the net's structure: fail this pass, not the process
      std::ostringstream msg;
      msg << "PSROIPooling " << this->layer_param_.name() << ": region " << r << " names batch index " << roi[0]
          << ", outside the " << num << " images of the score maps";
      throw std::runtime_error(msg.str());
    }
    const Dtype x1 = static_cast<Dtype>(std::round(roi[1])) * spatial_scale_;
    const Dtype y1 = static_cast<Dtype>(std::round(roi[2])) * spatial_scale_;
    const Dtype x2 = static_cast<Dtype>(std::round(roi[3]) + 1.) * spatial_scale_;
    const Dtype y2 = static_cast<Dtype>(std::round(roi[4]) + 1.) * spatial_scale_;
    const Dtype roi_w = std::max(x2 - x1, Dtype(0.1)), roi_h = std::max(y2 - y1, Dtype(0.1));
    const Dtype bin_h = roi_h / static_cast<Dtype>(pooled_height_);
    const Dtype bin_w = roi_w / static_cast<Dtype>(pooled_width_);
    for (int c = 0; c < output_dim_; ++c) {
      for (int ph = 0; ph < pooled_height_; ++ph) {
        int hs = static_cast<int>(std::floor(static_cast<Dtype>(ph) * bin_h + y1));
        int he = static_cast<int>(std::ceil(static_cast<Dtype>(ph + 1) * bin_h + y1));
        hs = std::min(std::max(hs, 0), height_);
        he = std::min(std::max(he, 0), height_);
        for (int pw = 0; pw < pooled_width_; ++pw) {
          int ws = static_cast<int>(std::floor(static_cast<Dtype>(pw) * bin_w + x1));
          int we = static_cast<int>(std::ceil(static_cast<Dtype>(pw + 1) * bin_w + x1));
          ws = std::min(std::max(ws, 0), width_);
          we = std::min(std::max(we, 0), width_);
          const int channel = (c * k + ph) * k + pw;
          const Dtype* plane = bottom[0]->cpu_data() + (n * channels_ + channel) * height_ * width_;
          Dtype sum = 0;
          for (int h = hs; h < he; ++h) {
            for (int w = ws; w < we; ++w) sum += plane[h * width_ + w];
          }
          const int area = (he - hs) * (we - ws);
          *out++ = (he <= hs || we <= ws) ? Dtype(0) : sum / area;
          *mapping++ = channel;
        }
      }
    }
  }
}

template <typename Dtype>
void PSROIPoolingLayer<Dtype>::Backward_cpu(const vector<Blob<Dtype>*>& top, const vector<bool>& propagate_down,
                                            const vector<Blob<Dtype>*>& bottom) {
  LOG(FATAL) << "PSROIPooling: caffe-serving builds the CPU code for inference only (no Backward)";
}

#ifdef CPU_ONLY
STUB_GPU(PSROIPoolingLayer);
#endif

INSTANTIATE_CLASS(PSROIPoolingLayer);
REGISTER_LAYER_CLASS(PSROIPooling);

}  // namespace caffe
