// hwc-run-vm: run a library exported by hwc in TVM's Relax VM on this machine's CPU.
//
// Built for aarch64 and run under qemu-aarch64 user emulation, it lets hwc check the outputs of an
// arm-a72 build where no board is at hand (no Python is needed on the emulated side, only TVM's
// aarch64 runtime libraries). Inputs come from raw files, outputs go to raw files:
//
//   hwc-run-vm LIBRARY OUT_DIR DTYPE:D0xD1x...:FILE [...]   (a 0-d input's shape is written "scalar")
//
// prints one line per output, "INDEX DTYPE D0xD1x...", and writes OUT_DIR/output_INDEX.bin.
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/dtype.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;

struct HostAlloc {
  void AllocData(DLTensor* t) {
    size_t size = (ffi::GetDataSize(*t) + 63) / 64 * 64;
    t->data = std::aligned_alloc(64, size == 0 ? 64 : size);
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

static std::vector<std::string> Split(const std::string& text, char sep) {
  std::vector<std::string> parts;
  std::stringstream stream(text);
  std::string part;
  while (std::getline(stream, part, sep)) parts.push_back(part);
  return parts;
}

static ffi::Tensor ReadInput(const std::string& spec) {
  std::vector<std::string> fields = Split(spec, ':');
  if (fields.size() != 3) throw std::runtime_error("input must be DTYPE:SHAPE:FILE, got " + spec);
  std::vector<int64_t> shape;
  if (fields[1] != "scalar")
    for (const std::string& dim : Split(fields[1], 'x')) shape.push_back(std::stoll(dim));
  ffi::Tensor tensor = ffi::Tensor::FromNDAlloc(HostAlloc(), ffi::ShapeView(shape.data(), shape.size()),
                                                ffi::StringToDLDataType(fields[0]), DLDevice{kDLCPU, 0});
  size_t size = ffi::GetDataSize(tensor);
  std::ifstream file(fields[2], std::ios::binary);
  file.read(static_cast<char*>(tensor.data_ptr()), static_cast<std::streamsize>(size));
  if (!file || file.gcount() != static_cast<std::streamsize>(size))
    throw std::runtime_error("cannot read " + std::to_string(size) + " bytes from " + fields[2]);
  return tensor;
}

static void WriteOutputs(const ffi::Any& value, const std::string& out_dir, int* index) {
  if (auto tensor = value.try_cast<ffi::Tensor>()) {
    const DLTensor* t = tensor.value().GetDLTensorPtr();
    std::string path = out_dir + "/output_" + std::to_string(*index) + ".bin";
    std::ofstream file(path, std::ios::binary);
    file.write(static_cast<const char*>(t->data) + t->byte_offset,
               static_cast<std::streamsize>(ffi::GetDataSize(*t)));
    if (!file) throw std::runtime_error("cannot write " + path);
    std::cout << *index << " " << ffi::DLDataTypeToString(t->dtype) << " ";
    for (int i = 0; i < t->ndim; ++i) std::cout << (i ? "x" : "") << t->shape[i];
    std::cout << (t->ndim == 0 ? "scalar" : "") << "\n";
    ++*index;
  } else if (auto items = value.try_cast<ffi::Array<ffi::Any>>()) {
    for (const ffi::Any& item : items.value()) WriteOutputs(item, out_dir, index);
  } else {
    throw std::runtime_error("output " + std::to_string(*index) + " is not a tensor");
  }
}

int main(int argc, char** argv) {
  if (argc < 3) {
    std::cerr << "usage: hwc-run-vm LIBRARY OUT_DIR DTYPE:SHAPE:FILE...\n";
    return 2;
  }
  try {
    ffi::Module library = ffi::Module::LoadFromFile(argv[1]);
    ffi::Module vm = library->GetFunction("vm_load_executable").value()().cast<ffi::Module>();
    constexpr int kPooledAllocator = 2;
    vm->GetFunction("vm_initialization").value()(static_cast<int>(kDLCPU), 0, kPooledAllocator);
    std::vector<ffi::Tensor> inputs;
    for (int i = 3; i < argc; ++i) inputs.push_back(ReadInput(argv[i]));
    std::vector<ffi::AnyView> args(inputs.begin(), inputs.end());
    ffi::Any result;
    vm->GetFunction("main").value().CallPacked(args.data(), static_cast<int32_t>(args.size()), &result);
    int index = 0;
    WriteOutputs(result, argv[2], &index);
  } catch (const std::exception& error) {
    std::cerr << "hwc-run-vm: " << error.what() << "\n";
    return 1;
  }
  return 0;
}
