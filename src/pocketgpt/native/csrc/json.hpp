// A small JSON reader: enough for model_config.json and a safetensors header.
// Values are parsed into a tree; errors name the byte where parsing stopped.
#pragma once

#include <string>
#include <utility>
#include <vector>

namespace pgpt::json {

struct Value {
    enum class Kind { Null, Bool, Number, String, Array, Object };
    Kind kind = Kind::Null;
    bool boolean = false;
    double number = 0.0;
    std::string string;
    std::vector<Value> array;
    std::vector<std::pair<std::string, Value>> object;  // in file order

    // The member named key of an object, or nullptr (also for a non-object).
    const Value* find(const std::string& key) const;
};

// Parses text[0..size); throws std::runtime_error("... at byte N") on malformed input.
Value parse(const char* text, size_t size);

}  // namespace pgpt::json
