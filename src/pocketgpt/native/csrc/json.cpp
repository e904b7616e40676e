#include "json.hpp"

#include <cstdlib>
#include <stdexcept>

namespace pgpt::json {

const Value* Value::find(const std::string& key) const {
    if (kind != Kind::Object) return nullptr;
    for (const auto& kv : object)
        if (kv.first == key) return &kv.second;
    return nullptr;
}

namespace {

// Recursive descent over a byte range; depth-limited so a hostile header cannot blow the stack.
class Parser {
  public:
    Parser(const char* text, size_t size) : p_(text), begin_(text), end_(text + size) {}

    Value document() {
        Value v = value(0);
        skip_space();
        if (p_ != end_) fail("unexpected trailing data");
        return v;
    }

  private:
    const char* p_;
    const char* begin_;
    const char* end_;

    [[noreturn]] void fail(const char* what) const {
        throw std::runtime_error(std::string(what) + " at byte " + std::to_string(p_ - begin_));
    }
    void skip_space() {
        while (p_ < end_ && (*p_ == ' ' || *p_ == '\n' || *p_ == '\r' || *p_ == '\t')) ++p_;
    }
    bool take(char c) {
        skip_space();
        if (p_ < end_ && *p_ == c) {
            ++p_;
            return true;
        }
        return false;
    }
    void expect(char c) {
        if (!take(c)) fail((std::string("expected '") + c + "'").c_str());
    }
    bool literal(const char* word) {
        const char* q = p_;
        for (const char* w = word; *w; ++w, ++q)
            if (q >= end_ || *q != *w) return false;
        p_ = q;
        return true;
    }

    Value value(int depth) {
        if (depth > 64) fail("nesting too deep");
        skip_space();
        if (p_ >= end_) fail("unexpected end of input");
        Value v;
        char c = *p_;
        if (c == '{') {
            ++p_;
            v.kind = Value::Kind::Object;
            if (take('}')) return v;
            do {
                skip_space();
                std::string key = string();
                expect(':');
                v.object.emplace_back(std::move(key), value(depth + 1));
            } while (take(','));
            expect('}');
        } else if (c == '[') {
            ++p_;
            v.kind = Value::Kind::Array;
            if (take(']')) return v;
            do {
                v.array.push_back(value(depth + 1));
            } while (take(','));
            expect(']');
        } else if (c == '"') {
            v.kind = Value::Kind::String;
            v.string = string();
        } else if (literal("true")) {
            v.kind = Value::Kind::Bool;
            v.boolean = true;
        } else if (literal("false")) {
            v.kind = Value::Kind::Bool;
        } else if (literal("null")) {
            v.kind = Value::Kind::Null;
        } else if (c == '-' || (c >= '0' && c <= '9')) {
            v.kind = Value::Kind::Number;
            v.number = number();
        } else {
            fail("unexpected character");
        }
        return v;
    }

    double number() {
        const char* start = p_;
        while (p_ < end_ && (std::string("+-.eE0123456789").find(*p_) != std::string::npos)) ++p_;
        std::string digits(start, p_);
        char* stop = nullptr;
        double d = std::strtod(digits.c_str(), &stop);
        if (digits.empty() || stop != digits.c_str() + digits.size()) fail("bad number");
        return d;
    }

    std::string string() {
        if (p_ >= end_ || *p_ != '"') fail("expected a string");
        ++p_;
        std::string out;
        while (true) {
            if (p_ >= end_) fail("unterminated string");
            char c = *p_++;
            if (c == '"') return out;
            if (c != '\\') {
                out += c;
                continue;
            }
            if (p_ >= end_) fail("unterminated escape");
            char e = *p_++;
            switch (e) {
                case '"': out += '"'; break;
                case '\\': out += '\\'; break;
                case '/': out += '/'; break;
                case 'b': out += '\b'; break;
                case 'f': out += '\f'; break;
                case 'n': out += '\n'; break;
                case 'r': out += '\r'; break;
                case 't': out += '\t'; break;
                case 'u': {
                    // Names we look up are ASCII; keep other code points as UTF-8.
                    if (end_ - p_ < 4) fail("short \\u escape");
                    unsigned cp = std::strtoul(std::string(p_, p_ + 4).c_str(), nullptr, 16);
                    p_ += 4;
                    if (cp < 0x80) {
                        out += static_cast<char>(cp);
                    } else if (cp < 0x800) {
                        out += static_cast<char>(0xC0 | (cp >> 6));
                        out += static_cast<char>(0x80 | (cp & 0x3F));
                    } else {
                        out += static_cast<char>(0xE0 | (cp >> 12));
                        out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
                        out += static_cast<char>(0x80 | (cp & 0x3F));
                    }
                    break;
                }
                default: fail("bad escape");
            }
        }
    }
};

}  // namespace

Value parse(const char* text, size_t size) { return Parser(text, size).document(); }

}  // namespace pgpt::json
