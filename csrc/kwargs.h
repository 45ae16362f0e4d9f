// The entry points' calling convention: keyword arguments only, each filling the field of the
// argument struct (sde_step_api.h, advantages_api.h) that has its name.
//
// The entry points take 6 to 27 values (sizes, raw addresses, scalars, a stream). Passed by
// position, one transposed pair in one of the places that spell the order would go unnoticed;
// passed by name, each value lands in the field of its name, and a missing or unknown name is a
// TypeError. Bindings only; kernels see the plain structs.
//
// These functions are on every op call's path, so they are plain CPython vectorcall functions
// (METH_FASTCALL | METH_KEYWORDS, no dict is built) rather than pybind11 functions taking
// **kwargs (which copies the dict): ~1 us for sde_step's 19 fields where **kwargs cost ~3 us more
// than 19 positional arguments.
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace diffrl {

class KwargsReader {
 public:
  KwargsReader(const char* function, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames)
      : function_(function), values_(args + nargs), names_(kwnames),
        count_(kwnames == nullptr ? 0 : PyTuple_GET_SIZE(kwnames)) {
    if (nargs != 0) throw pybind11::type_error(std::string(function_) + ": takes keyword arguments only");
  }

  // A scalar field (an integer or floating-point type) or a pointer field, which Python passes as
  // an address (tensor.data_ptr(), 0 for "absent").
  template <typename T>
  KwargsReader& operator()(const char* name, T& field) {
    PyObject* value = find(name);
    if (value == nullptr) throw pybind11::type_error(std::string(function_) + ": missing argument '" + name + "'");
    ++read_;
    if constexpr (std::is_pointer_v<T>) {
      field = reinterpret_cast<T>(static_cast<std::uintptr_t>(PyLong_AsUnsignedLongLong(value)));
    } else if constexpr (std::is_floating_point_v<T>) {
      field = static_cast<T>(PyFloat_AsDouble(value));
    } else if constexpr (std::is_unsigned_v<T>) {
      field = static_cast<T>(PyLong_AsUnsignedLongLong(value));
    } else {
      const long long v = PyLong_AsLongLong(value);
      if (v != static_cast<long long>(static_cast<T>(v)) && !PyErr_Occurred())
        PyErr_SetString(PyExc_OverflowError, "value out of range");
      field = static_cast<T>(v);
    }
    if (PyErr_Occurred()) {
      const std::string what = pybind11::error_already_set().what();  // fetches and clears it
      throw pybind11::type_error(std::string(function_) + ": argument '" + name + "': " + what);
    }
    return *this;
  }

  // Call after the last field: a keyword that no field read is a typo or a stale caller.
  void finish() const {
    if (read_ == count_) return;
    std::string unknown;
    for (Py_ssize_t i = 0; i < count_; ++i) {
      if (!(read_mask(i))) unknown += (unknown.empty() ? "'" : ", '") + std::string(key(i)) + "'";
    }
    throw pybind11::type_error(std::string(function_) + ": unexpected argument(s) " + unknown);
  }

 private:
  static constexpr Py_ssize_t kMaxFields = 64;

  const char* key(Py_ssize_t i) const {
    const char* k = PyUnicode_AsUTF8(PyTuple_GET_ITEM(names_, i));  // cached by CPython: no allocation
    return k == nullptr ? "" : k;
  }
  bool read_mask(Py_ssize_t i) const { return i < kMaxFields && seen_[i]; }

  // Callers pass the fields in the order they are read (the struct's order): then each look-up
  // is one string compare with the next name; otherwise a scan of the (few) names.
  PyObject* find(const char* name) {
    for (Py_ssize_t n = 0; n < count_; ++n) {
      const Py_ssize_t i = (next_ + n) % count_;
      if (std::strcmp(key(i), name) == 0) {
        if (i < kMaxFields) seen_[i] = true;
        next_ = i + 1;
        return values_[i];
      }
    }
    return nullptr;
  }

  const char* function_;
  PyObject* const* values_;
  PyObject* names_;
  Py_ssize_t count_;
  Py_ssize_t next_ = 0;
  Py_ssize_t read_ = 0;
  bool seen_[kMaxFields] = {};
};

namespace kwargs_detail {

// Runs Read then Run; C++ exceptions become Python ones as pybind11 would translate them.
template <typename Args, void (*Read)(KwargsReader&, Args&), void (*Run)(const Args&), bool ReleaseGil>
PyObject* entry(PyObject* self, PyObject* const* args, Py_ssize_t nargsf, PyObject* kwnames) {
  try {
    Args p{};
    KwargsReader r(PyUnicode_AsUTF8(self), args, PyVectorcall_NARGS(nargsf), kwnames);
    Read(r, p);
    r.finish();
    if (ReleaseGil) {
      pybind11::gil_scoped_release nogil;
      Run(p);
    } else {
      Run(p);
    }
    Py_RETURN_NONE;
  } catch (pybind11::error_already_set& e) {
    e.restore();
  } catch (const pybind11::builtin_exception& e) {
    e.set_error();
  } catch (const std::invalid_argument& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
  return nullptr;
}

}  // namespace kwargs_detail

// Adds `function(**fields)` to the module: reads Args with Read, then runs Run(args), with the GIL
// released when ReleaseGil (CPU kernels, which may run long; CUDA launches return at once).
template <typename Args, void (*Read)(KwargsReader&, Args&), void (*Run)(const Args&), bool ReleaseGil>
void def_kwargs(pybind11::module_& m, const char* function, const char* doc) {
  // a method table entry lives as long as its function, i.e. the process (as pybind11's own records)
  auto* def = new PyMethodDef{function,
                              reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(
                                  &kwargs_detail::entry<Args, Read, Run, ReleaseGil>)),
                              METH_FASTCALL | METH_KEYWORDS, doc};
  pybind11::str self(function);  // the function's `self`: its name, for the error messages
  PyObject* fn = PyCFunction_NewEx(def, self.ptr(), m.attr("__name__").ptr());
  if (fn == nullptr) throw pybind11::error_already_set();
  m.add_object(function, pybind11::reinterpret_steal<pybind11::object>(fn));
}

}  // namespace diffrl
