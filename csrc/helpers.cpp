// megagpt data helpers: the GPT sample index and the blending indices, with Megatron-LM core semantics
// (megatron/core/datasets/helpers.cpp). Plain C++17 + pybind11, no torch.
//
// Each function has a pure-numpy twin in megagpt/data/helpers.py (`*_reference`); tests/data/test_helpers.py
// checks that both give identical arrays on random inputs. Inputs are validated here, with the GIL held, and
// refused with std::invalid_argument (pybind11 turns it into ValueError); the loops then run without the GIL.
//
// Floating-point note: the blending error `weight * x - count` must round exactly like numpy's, so this file
// must not be compiled with FMA contraction (the default x86-64 target has no FMA, and setup.py adds no -march).

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

constexpr int64_t kMaxDatasets = std::numeric_limits<int16_t>::max();  // dataset ids are stored as int16

// ---------------------------------------------------------------------------------------------- validation

template <typename T>
std::string dtype_name() {
    return py::str(py::dtype::of<T>()).cast<std::string>();
}

// A 1-D, C-contiguous numpy array of exactly dtype T (no silent casts: a cast copy of an output array would
// swallow the results, and a cast copy of an input hides a caller bug).
template <typename T>
py::array_t<T> require_1d(const py::object& obj, const char* name, bool writeable) {
    if (!py::isinstance<py::array>(obj)) {
        throw std::invalid_argument(std::string(name) + " must be a numpy array of " + dtype_name<T>() +
                                    ", got " + py::str(py::type::of(obj)).cast<std::string>());
    }
    py::array arr = py::reinterpret_borrow<py::array>(obj);
    // isinstance<array_t<T>> compares dtypes by equivalence (PyArray_EquivTypes), not identity: arrays that
    // went through pickle, or np.longlong for int64, carry equal but distinct dtype objects.
    if (!py::isinstance<py::array_t<T>>(obj)) {
        throw std::invalid_argument(std::string(name) + " must have dtype " + dtype_name<T>() + ", got " +
                                    py::str(arr.dtype()).cast<std::string>() + " (convert with .astype)");
    }
    if (arr.ndim() != 1) {
        throw std::invalid_argument(std::string(name) + " must be 1-D, got " + std::to_string(arr.ndim()) +
                                    " dimensions");
    }
    if (!(arr.flags() & py::array::c_style)) {
        throw std::invalid_argument(std::string(name) + " must be C-contiguous (use numpy.ascontiguousarray)");
    }
    if (writeable && !arr.writeable()) {
        throw std::invalid_argument(std::string(name) + " is an output array and must be writeable");
    }
    return py::reinterpret_borrow<py::array_t<T>>(arr);
}

void require(bool ok, const std::string& message) {
    if (!ok) throw std::invalid_argument(message);
}

// ---------------------------------------------------------------------------------------------- sample index

int64_t num_samples_for(int64_t num_tokens, int64_t seq_length, int extra, bool drop_last) {
    const int64_t usable = num_tokens - extra;
    // Integer ceiling: Megatron goes through float here, which is inexact past 2^24 tokens.
    return drop_last ? usable / seq_length : (usable + seq_length - 1) / seq_length;
}

// Walks the shuffled documents, cutting a sample of (seq_length + extra) tokens every seq_length tokens; the
// `extra` token is shared by consecutive samples (the label of one sample's last position). Row s holds
// (position in document_idx, token offset in that document) where sample s starts; row num_samples is where
// the last sample ends (minus `extra`).
template <typename T>
void fill_sample_idx(T* out, const int32_t* sizes, const int32_t* document_idx, int64_t num_docs,
                     int64_t seq_length, int64_t num_samples, int extra) {
    int64_t doc_i = 0;
    int64_t offset = 0;
    out[0] = 0;
    out[1] = 0;
    for (int64_t s = 1; s <= num_samples; ++s) {
        int64_t remaining = seq_length + extra;
        while (remaining != 0) {
            const int64_t doc_len = sizes[document_idx[doc_i]] - offset;
            remaining -= doc_len;
            if (remaining <= 0) {
                // The sample ends inside this document; the next one starts `extra` tokens before that end.
                offset += remaining + doc_len - extra;
                remaining = 0;
            } else if (doc_i == num_docs - 1) {
                // Out of documents: only the last (partial) sample may get here.
                if (s != num_samples) {
                    throw std::invalid_argument(
                        "document_idx runs out of tokens at sample " + std::to_string(s) + " of " +
                        std::to_string(num_samples) +
                        ": sizes[document_idx] must sum to at least num_epochs * tokens_per_epoch");
                }
                offset = sizes[document_idx[doc_i]] - extra;
                break;
            } else {
                ++doc_i;
                offset = 0;
            }
        }
        out[2 * s] = static_cast<T>(doc_i);
        out[2 * s + 1] = static_cast<T>(offset);
    }
}

py::array build_sample_idx(const py::object& sizes_obj, const py::object& document_idx_obj, int32_t seq_length,
                           int32_t num_epochs, int64_t tokens_per_epoch, bool drop_last_partial_sequence,
                           int add_extra_token_to_sequence) {
    auto sizes = require_1d<int32_t>(sizes_obj, "sizes", false);
    auto document_idx = require_1d<int32_t>(document_idx_obj, "document_idx", false);
    const int extra = add_extra_token_to_sequence;
    require(extra == 0 || extra == 1,
            "add_extra_token_to_sequence must be 0 or 1, got " + std::to_string(extra));
    require(seq_length >= 1, "seq_length must be >= 1, got " + std::to_string(seq_length));
    require(num_epochs >= 1, "num_epochs must be >= 1, got " + std::to_string(num_epochs));
    require(tokens_per_epoch >= 1, "tokens_per_epoch must be >= 1, got " + std::to_string(tokens_per_epoch));
    require(tokens_per_epoch <= std::numeric_limits<int64_t>::max() / num_epochs,
            "num_epochs * tokens_per_epoch overflows int64");
    const int64_t num_sizes = sizes.shape(0);
    const int64_t num_docs = document_idx.shape(0);
    require(num_docs >= 1, "document_idx is empty: a sample index needs at least one document");

    const int32_t* sizes_ptr = sizes.data();
    const int32_t* doc_ptr = document_idx.data();
    int32_t max_size = 0;
    {
        py::gil_scoped_release release;
        for (int64_t i = 0; i < num_sizes; ++i) {
            if (sizes_ptr[i] < 0) {
                throw std::invalid_argument("sizes[" + std::to_string(i) + "] = " + std::to_string(sizes_ptr[i]) +
                                            " is negative");
            }
            max_size = std::max(max_size, sizes_ptr[i]);
        }
        for (int64_t i = 0; i < num_docs; ++i) {
            if (doc_ptr[i] < 0 || doc_ptr[i] >= num_sizes) {
                throw std::invalid_argument("document_idx[" + std::to_string(i) + "] = " +
                                            std::to_string(doc_ptr[i]) + " is outside sizes (length " +
                                            std::to_string(num_sizes) + ")");
            }
        }
    }

    const int64_t num_tokens = static_cast<int64_t>(num_epochs) * tokens_per_epoch;
    const int64_t num_samples = num_samples_for(num_tokens, seq_length, extra, drop_last_partial_sequence);
    require(num_samples >= 0, "num_epochs * tokens_per_epoch = " + std::to_string(num_tokens) +
                                  " is fewer than the one extra token a sample needs");

    // Megatron's dtype rule: int32 when neither a document position nor an offset can exceed int32.
    const bool fits_int32 = std::max<int64_t>(num_docs, max_size) <= std::numeric_limits<int32_t>::max();
    const std::vector<py::ssize_t> shape{num_samples + 1, 2};
    if (fits_int32) {
        py::array_t<int32_t> out(shape);
        int32_t* out_ptr = out.mutable_data();
        py::gil_scoped_release release;
        fill_sample_idx<int32_t>(out_ptr, sizes_ptr, doc_ptr, num_docs, seq_length, num_samples, extra);
        return std::move(out);
    }
    py::array_t<int64_t> out(shape);
    int64_t* out_ptr = out.mutable_data();
    py::gil_scoped_release release;
    fill_sample_idx<int64_t>(out_ptr, sizes_ptr, doc_ptr, num_docs, seq_length, num_samples, extra);
    return std::move(out);
}

// ---------------------------------------------------------------------------------------------- blending

void build_blending_indices(const py::object& dataset_index_obj, const py::object& dataset_sample_index_obj,
                            const py::object& weights_obj, int32_t num_datasets, int64_t size, bool verbose) {
    auto dataset_index = require_1d<int16_t>(dataset_index_obj, "dataset_index", true);
    auto dataset_sample_index = require_1d<int64_t>(dataset_sample_index_obj, "dataset_sample_index", true);
    auto weights = require_1d<double>(weights_obj, "weights", false);
    require(num_datasets >= 1 && num_datasets <= kMaxDatasets,
            "num_datasets must be in [1, " + std::to_string(kMaxDatasets) + "], got " +
                std::to_string(num_datasets));
    require(size >= 0, "size must be >= 0, got " + std::to_string(size));
    require(weights.shape(0) == num_datasets, "weights has " + std::to_string(weights.shape(0)) +
                                                  " entries but num_datasets is " + std::to_string(num_datasets));
    require(dataset_index.shape(0) == size, "dataset_index has length " + std::to_string(dataset_index.shape(0)) +
                                                " but size is " + std::to_string(size));
    require(dataset_sample_index.shape(0) == size, "dataset_sample_index has length " +
                                                       std::to_string(dataset_sample_index.shape(0)) +
                                                       " but size is " + std::to_string(size));
    const double* w = weights.data();
    double weight_sum = 0.0;
    for (int32_t d = 0; d < num_datasets; ++d) {
        require(std::isfinite(w[d]) && w[d] >= 0.0,
                "weights[" + std::to_string(d) + "] = " + std::to_string(w[d]) + " must be finite and >= 0");
        weight_sum += w[d];
    }
    require(weight_sum > 0.0, "weights are all zero: at least one dataset needs a positive weight");

    int16_t* out_dataset = dataset_index.mutable_data();
    int64_t* out_sample = dataset_sample_index.mutable_data();
    std::vector<int64_t> current(num_datasets, 0);
    {
        py::gil_scoped_release release;
        for (int64_t i = 0; i < size; ++i) {
            // Pick the dataset furthest behind its target share; the first one wins a tie.
            const double x = std::max(static_cast<double>(i), 1.0);
            int32_t best = 0;
            double best_error = w[0] * x - static_cast<double>(current[0]);
            for (int32_t d = 1; d < num_datasets; ++d) {
                const double error = w[d] * x - static_cast<double>(current[d]);
                if (error > best_error) {
                    best_error = error;
                    best = d;
                }
            }
            out_dataset[i] = static_cast<int16_t>(best);
            out_sample[i] = current[best];
            ++current[best];
        }
    }
    if (verbose) {
        for (int32_t d = 0; d < num_datasets; ++d) {
            const double achieved = size > 0 ? static_cast<double>(current[d]) / static_cast<double>(size) : 0.0;
            py::print("  blending: dataset", d, "weight", w[d], "achieved", achieved);
        }
    }
}

void build_exhaustive_blending_indices(const py::object& dataset_index_obj,
                                       const py::object& dataset_sample_index_obj, const py::object& sizes_obj,
                                       int32_t num_datasets) {
    auto dataset_index = require_1d<int16_t>(dataset_index_obj, "dataset_index", true);
    auto dataset_sample_index = require_1d<int64_t>(dataset_sample_index_obj, "dataset_sample_index", true);
    auto sizes = require_1d<int64_t>(sizes_obj, "sizes", false);
    require(num_datasets >= 1 && num_datasets <= kMaxDatasets,
            "num_datasets must be in [1, " + std::to_string(kMaxDatasets) + "], got " +
                std::to_string(num_datasets));
    require(sizes.shape(0) == num_datasets, "sizes has " + std::to_string(sizes.shape(0)) +
                                                " entries but num_datasets is " + std::to_string(num_datasets));
    const int64_t* n = sizes.data();
    int64_t total = 0;
    for (int32_t d = 0; d < num_datasets; ++d) {
        require(n[d] >= 0, "sizes[" + std::to_string(d) + "] = " + std::to_string(n[d]) + " is negative");
        require(total <= std::numeric_limits<int64_t>::max() - n[d], "sizes sum overflows int64");
        total += n[d];
    }
    require(dataset_index.shape(0) == total, "dataset_index has length " +
                                                 std::to_string(dataset_index.shape(0)) +
                                                 " but sizes sum to " + std::to_string(total));
    require(dataset_sample_index.shape(0) == total, "dataset_sample_index has length " +
                                                        std::to_string(dataset_sample_index.shape(0)) +
                                                        " but sizes sum to " + std::to_string(total));

    int16_t* out_dataset = dataset_index.mutable_data();
    int64_t* out_sample = dataset_sample_index.mutable_data();
    py::gil_scoped_release release;
    std::vector<double> weights(num_datasets);
    std::vector<int64_t> current(num_datasets, 0);
    // Datasets still owed samples, in increasing id order. Megatron also starts with the empty ones, which
    // can then be picked on a tie and never leave the set (it overruns its output and crashes); leaving them
    // out keeps exactly sizes[d] per dataset and changes nothing when no size is zero.
    std::vector<int32_t> unspent;
    for (int32_t d = 0; d < num_datasets; ++d) {
        weights[d] = static_cast<double>(n[d]) / static_cast<double>(total);
        if (n[d] > 0) unspent.push_back(d);
    }
    for (int64_t i = 0; i < total; ++i) {
        const double x = std::max(static_cast<double>(i), 1.0);
        int32_t best = -1;
        double best_error = std::numeric_limits<double>::lowest();
        for (int32_t d : unspent) {
            const double error = weights[d] * x - static_cast<double>(current[d]);
            if (error > best_error) {
                best_error = error;
                best = d;
            }
        }
        out_dataset[i] = static_cast<int16_t>(best);
        out_sample[i] = current[best];
        if (++current[best] == n[best]) {
            unspent.erase(std::find(unspent.begin(), unspent.end(), best));
        }
    }
}

}  // namespace

PYBIND11_MODULE(_helpers, m) {
    m.doc() = "megagpt data helpers: GPT sample index and blending indices (Megatron-LM core semantics)";
    m.def("build_sample_idx", &build_sample_idx, py::arg("sizes"), py::arg("document_idx"), py::arg("seq_length"),
          py::arg("num_epochs"), py::arg("tokens_per_epoch"), py::arg("drop_last_partial_sequence") = true,
          py::arg("add_extra_token_to_sequence") = 1,
          "Sample index [num_samples + 1, 2] of (document_idx position, token offset); int32 when it fits.");
    m.def("build_blending_indices", &build_blending_indices, py::arg("dataset_index"),
          py::arg("dataset_sample_index"), py::arg("weights"), py::arg("num_datasets"), py::arg("size"),
          py::arg("verbose") = false,
          "Fill dataset_index (int16) and dataset_sample_index (int64) by greedy max-error blending.");
    m.def("build_exhaustive_blending_indices", &build_exhaustive_blending_indices, py::arg("dataset_index"),
          py::arg("dataset_sample_index"), py::arg("sizes"), py::arg("num_datasets"),
          "Fill the blending indices taking exactly sizes[d] samples from each dataset d.");
}
