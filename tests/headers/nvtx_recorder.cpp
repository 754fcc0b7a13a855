// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// The recorder of nvtx_recorder.hpp, injected statically: NVTX3's loader calls the function that
// InitializeInjectionNvtx2_fnptr points to when no tool was named by NVTX_INJECTION64_PATH (this
// strong definition replaces the weak null one every NVTX3 translation unit carries). The function
// fills the domain-range slots of NVTX's function table with the recorders below.

#include <cstdint>

// NVTX's loader reads the pointer; with NVTX_STATIC_INJECTION_IMPL its headers leave the declaration
// (and the definition, at the end of this file) to the injection. The type is
// NvtxInitializeInjectionNvtxFunc_t, spelled out because it is declared by the headers below.
extern "C" {
extern int (*InitializeInjectionNvtx2_fnptr)(void const* (*)(std::uint32_t));
}
#define NVTX_STATIC_INJECTION_IMPL
#include <nvtx3/nvToolsExt.h>

#include "nvtx_recorder.hpp"

#include <deque>
#include <map>
#include <mutex>
#include <utility>

namespace epx::test {
namespace {

struct Recorder {
  std::mutex mutex;
  bool attached = false;
  std::deque<std::string> domains;             // stable addresses: a domain handle points here
  std::map<void const*, std::string> strings;  // registered string handle -> text
  std::deque<std::string> string_texts;        // a string handle points here
  std::vector<NvtxEvent> events;
};

Recorder& recorder() {
  static Recorder r;
  return r;
}

std::string domain_name(nvtxDomainHandle_t domain) {
  return domain == nullptr ? std::string() : *reinterpret_cast<std::string const*>(domain);
}

nvtxDomainHandle_t NVTX_API create_domain(char const* name) {
  Recorder& r = recorder();
  std::lock_guard lock(r.mutex);
  r.domains.emplace_back(name);
  return reinterpret_cast<nvtxDomainHandle_t>(&r.domains.back());
}

nvtxStringHandle_t NVTX_API register_string(nvtxDomainHandle_t, char const* text) {
  Recorder& r = recorder();
  std::lock_guard lock(r.mutex);
  r.string_texts.emplace_back(text);
  void const* handle = &r.string_texts.back();
  r.strings[handle] = text;
  return reinterpret_cast<nvtxStringHandle_t>(const_cast<void*>(handle));
}

int NVTX_API push(nvtxDomainHandle_t domain, nvtxEventAttributes_t const* attributes) {
  Recorder& r = recorder();
  std::lock_guard lock(r.mutex);
  NvtxEvent e{NvtxEvent::Kind::kPush, domain_name(domain), "", false};
  if (attributes != nullptr && attributes->messageType == NVTX_MESSAGE_TYPE_REGISTERED) {
    auto const it = r.strings.find(attributes->message.registered);
    e.message = it == r.strings.end() ? "<unknown string handle>" : it->second;
    e.registered = true;
  } else if (attributes != nullptr && attributes->messageType == NVTX_MESSAGE_TYPE_ASCII) {
    e.message = attributes->message.ascii;
  }
  r.events.push_back(std::move(e));
  return static_cast<int>(r.events.size());
}

int NVTX_API pop(nvtxDomainHandle_t domain) {
  Recorder& r = recorder();
  std::lock_guard lock(r.mutex);
  r.events.push_back(NvtxEvent{NvtxEvent::Kind::kPop, domain_name(domain), "", false});
  return 0;
}

template <class F>
void install(NvtxFunctionTable table, unsigned size, NvtxCallbackIdCore2 slot, F* function) {
  if (static_cast<unsigned>(slot) <= size && table[slot] != nullptr)
    *table[slot] = reinterpret_cast<NvtxFunctionPointer>(function);
}

int NVTX_API initialize(NvtxGetExportTableFunc_t get_export_table) {
  auto const* callbacks = static_cast<NvtxExportTableCallbacks const*>(get_export_table(NVTX_ETID_CALLBACKS));
  NvtxFunctionTable table = nullptr;
  unsigned size = 0;
  if (callbacks == nullptr || callbacks->GetModuleFunctionTable(NVTX_CB_MODULE_CORE2, &table, &size) == 0) return 0;
  install(table, size, NVTX_CBID_CORE2_DomainCreateA, &create_domain);
  install(table, size, NVTX_CBID_CORE2_DomainRegisterStringA, &register_string);
  install(table, size, NVTX_CBID_CORE2_DomainRangePushEx, &push);
  install(table, size, NVTX_CBID_CORE2_DomainRangePop, &pop);
  std::lock_guard lock(recorder().mutex);
  recorder().attached = true;
  return 1;
}

}  // namespace

bool nvtx_recorder_attached() {
  nvtxInitialize(nullptr);  // runs the loader (and `initialize`) once, if nothing has yet
  std::lock_guard lock(recorder().mutex);
  return recorder().attached;
}

std::vector<NvtxEvent> take_nvtx_events() {
  std::lock_guard lock(recorder().mutex);
  return std::exchange(recorder().events, {});
}

}  // namespace epx::test

extern "C" {
NvtxInitializeInjectionNvtxFunc_t InitializeInjectionNvtx2_fnptr = &epx::test::initialize;
}
